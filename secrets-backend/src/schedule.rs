//! Rotation schedules: `manual`, an interval (`30d`, `every 12h`) or a
//! five-field cron expression (`0 3 * * 1`, UTC), plus a rotation window,
//! jitter, a minimum interval and a one-off "next rotation at" override.
//!
//! The next rotation time is stored on the secret row; when it comes, the
//! replica whose compare-and-swap on that time succeeds fires the rotation
//! (see [`crate::store::Store::claim_schedule`]), so several replicas never
//! rotate the same secret twice for one due time.

use std::str::FromStr;
use std::time::Duration;

use chrono::{TimeZone, Utc};

use crate::error::{Error, Result};
use crate::store::SecretRow;

#[derive(Debug, Clone)]
pub enum Spec {
    Manual,
    Every(Duration),
    Cron(Box<croner::Cron>),
}

/// Parses a schedule; the error names the accepted forms.
pub fn parse(spec: &str) -> Result<Spec> {
    let s = spec.trim();
    if s.is_empty() || s == "manual" {
        return Ok(Spec::Manual);
    }
    let interval = s.strip_prefix("every ").unwrap_or(s).trim();
    if let Ok(d) = humantime::parse_duration(interval) {
        if d < Duration::from_secs(1) {
            return Err(Error::InvalidArgument(format!(
                "schedule {s:?}: the interval must be at least 1s"
            )));
        }
        return Ok(Spec::Every(d));
    }
    if s.split_whitespace().count() == 5
        && let Ok(c) = croner::Cron::from_str(s)
    {
        return Ok(Spec::Cron(Box::new(c)));
    }
    Err(Error::InvalidArgument(format!(
        "schedule {s:?}: expected \"manual\", an interval such as \"30d\" or \"every 12h\", or a five-field cron expression such as \"0 3 * * 1\""
    )))
}

/// A uniformly random offset in `[0, max_ms)`.
fn random_below(max_ms: i64) -> i64 {
    if max_ms <= 0 {
        return 0;
    }
    let b = rekey_keyring::random_bytes(8).map(|b| {
        let mut a = [0u8; 8];
        a.copy_from_slice(b.expose());
        u64::from_le_bytes(a)
    });
    let max = u64::try_from(max_ms).unwrap_or(u64::MAX);
    // Below `max_ms`, so it fits.
    i64::try_from(b.unwrap_or(0) % max).unwrap_or(0)
}

/// When `s` should next rotate, given that it last rotated (or was created)
/// at `s.last_rotated_at_ms` / `s.created_at_ms`; 0 means never.
pub fn next_rotation(s: &SecretRow, now_ms: i64) -> Result<i64> {
    if s.next_override_ms > now_ms {
        return Ok(s.next_override_ms);
    }
    let base = if s.last_rotated_at_ms > 0 {
        s.last_rotated_at_ms
    } else {
        s.created_at_ms
    };
    let earliest = base + s.min_interval_ms.max(0);
    let due = match parse(&s.schedule_spec)? {
        Spec::Manual => return Ok(0),
        Spec::Every(d) => base.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        Spec::Cron(c) => {
            let from = Utc
                .timestamp_millis_opt(now_ms.max(earliest))
                .single()
                .unwrap_or_else(Utc::now);
            c.find_next_occurrence(&from, false)
                .map_err(|e| {
                    Error::InvalidArgument(format!("schedule {:?}: {e}", s.schedule_spec))
                })?
                .timestamp_millis()
        }
    };
    let t = due + random_below(s.rotation_window_ms) + random_below(s.jitter_ms);
    Ok(t.max(earliest).max(now_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    fn row(spec: &str) -> SecretRow {
        SecretRow {
            id: "s".into(),
            schedule_spec: spec.into(),
            created_at_ms: 1_000 * H,
            ..Default::default()
        }
    }

    #[test]
    fn parses_the_three_forms() {
        assert!(matches!(parse("").unwrap(), Spec::Manual));
        assert!(matches!(parse("manual").unwrap(), Spec::Manual));
        assert!(matches!(parse("30d").unwrap(), Spec::Every(d) if d.as_secs() == 30 * 86400));
        assert!(matches!(parse("every 12h").unwrap(), Spec::Every(_)));
        assert!(matches!(parse("0 3 * * 1").unwrap(), Spec::Cron(_)));
        let e = parse("sometimes").unwrap_err();
        assert!(e.to_string().contains("cron"), "{e}");
        assert!(parse("every 10ms").is_err());
    }

    #[test]
    fn interval_counts_from_last_rotation() {
        let mut s = row("12h");
        assert_eq!(next_rotation(&s, 1_000 * H).unwrap(), 1_012 * H);
        s.last_rotated_at_ms = 1_005 * H;
        assert_eq!(next_rotation(&s, 1_006 * H).unwrap(), 1_017 * H);
        // Overdue (the backend was down): now, not in the past.
        assert_eq!(next_rotation(&s, 2_000 * H).unwrap(), 2_000 * H);
    }

    #[test]
    fn manual_never_fires_and_override_wins() {
        let mut s = row("manual");
        assert_eq!(next_rotation(&s, 1_000 * H).unwrap(), 0);
        s.next_override_ms = 1_001 * H;
        assert_eq!(next_rotation(&s, 1_000 * H).unwrap(), 1_001 * H);
    }

    #[test]
    fn window_and_jitter_stay_in_bounds_and_min_interval_holds() {
        let mut s = row("1h");
        s.rotation_window_ms = H;
        s.jitter_ms = 60_000;
        for _ in 0..50 {
            let t = next_rotation(&s, 1_000 * H).unwrap();
            assert!((1_001 * H..1_002 * H + 60_000).contains(&t), "{t}");
        }
        let mut s = row("1h");
        s.min_interval_ms = 5 * H;
        assert_eq!(next_rotation(&s, 1_000 * H).unwrap(), 1_005 * H);
    }

    #[test]
    fn cron_finds_the_next_occurrence_in_utc() {
        let s = row("0 3 * * *");
        // 2026-11-26T12:00:00Z -> next 03:00 is 2026-11-27T03:00:00Z.
        let now = Utc
            .with_ymd_and_hms(2026, 11, 26, 12, 0, 0)
            .unwrap()
            .timestamp_millis();
        let want = Utc
            .with_ymd_and_hms(2026, 11, 27, 3, 0, 0)
            .unwrap()
            .timestamp_millis();
        assert_eq!(next_rotation(&s, now).unwrap(), want);
    }
}
