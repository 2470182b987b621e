//! The `rekey.v1` gRPC API, generated from `rekey/v1/*.proto`.
//!
//! Message types carrying secret values (`SecretValue`, `StructuredValue`)
//! print `[redacted]` under `Debug`, so a request or response can be logged
//! whole without leaking a value.

pub mod json;

pub mod v1 {
    #![allow(clippy::all, reason = "generated code")]
    tonic::include_proto!("rekey.v1");

    /// Encoded `FileDescriptorSet` for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/rekey_v1_descriptor.bin"));

    impl std::fmt::Debug for SecretValue {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("SecretValue([redacted])")
        }
    }

    impl std::fmt::Debug for StructuredValue {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let keys: Vec<&String> = self.fields.keys().collect();
            write!(f, "StructuredValue {{ fields: {keys:?} = [redacted] }}")
        }
    }

    impl Stage {
        /// The lower-case name used by the CLI and in JSON: `current`, ...
        pub fn label(self) -> &'static str {
            match self {
                Stage::Current => "current",
                Stage::Previous => "previous",
                Stage::Pending => "pending",
                Stage::Unspecified => "unspecified",
            }
        }
    }

    impl VersionState {
        /// `active` or `revoked`.
        pub fn label(self) -> &'static str {
            match self {
                VersionState::Active => "active",
                VersionState::Revoked => "revoked",
                VersionState::Unspecified => "unspecified",
            }
        }
    }
}

/// Formats Unix milliseconds (the API's time unit) as RFC 3339 UTC with
/// milliseconds, e.g. `2026-11-26T12:28:15.123Z`; `-` when out of range.
pub fn format_time(ms: i64) -> String {
    use chrono::TimeZone;
    match chrono::Utc.timestamp_millis_opt(ms).single() {
        Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        None => String::from("-"),
    }
}

#[cfg(test)]
mod tests {
    use super::v1::{SecretValue, StructuredValue, Version, secret_value};

    #[test]
    fn times_are_rfc3339_utc_with_millis() {
        assert_eq!(
            super::format_time(1_795_000_000_123),
            "2026-11-18T11:06:40.123Z"
        );
    }

    #[test]
    fn debug_never_prints_a_value() {
        let v = Version {
            version: 3,
            value: Some(SecretValue {
                value: Some(secret_value::Value::Raw(b"hunter2-topsecret".to_vec())),
            }),
            ..Default::default()
        };
        let s = format!("{v:?}");
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("[redacted]"));
        let m = StructuredValue {
            fields: [("password".to_string(), "hunter2-topsecret".to_string())].into(),
        };
        let s = format!("{m:?}");
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("password"));
    }

    #[test]
    fn descriptor_set_is_embedded() {
        assert!(super::v1::FILE_DESCRIPTOR_SET.len() > 100);
    }
}
