//! Redis URLs: `redis://` and `rediss://` (TLS).

use rekey_keyring::SecretString;

/// A Redis URL: `redis://` or `rediss://` (TLS), then
/// `[user[:password]@]host[:port][/db]`. Its `Debug` leaves the password
/// out.
pub struct RedisUrl {
    /// `host:port`, port 6379 by default.
    pub addr: String,
    /// `rediss://`: TLS.
    pub tls: bool,
    pub user: Option<String>,
    pub password: Option<SecretString>,
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisUrl")
            .field("addr", &self.addr)
            .field("tls", &self.tls)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

/// Reads a `redis://` or `rediss://` URL. `None` for another scheme or no
/// host.
#[must_use]
pub fn parse_url(url: &str) -> Option<RedisUrl> {
    let (rest, tls) = match url.strip_prefix("rediss://") {
        Some(r) => (r, true),
        None => (url.strip_prefix("redis://")?, false),
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some((a, h)) => (Some(a), h),
        None => (None, rest),
    };
    let host = host.split(['/', '?', '#']).next().unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    let has_port = match host.strip_prefix('[') {
        Some(v6) => v6.contains("]:"),
        None => host_of(host) != host,
    };
    let addr = if has_port {
        host.to_string()
    } else {
        format!("{host}:6379")
    };
    let (user, password) = match auth {
        Some(a) => match a.split_once(':') {
            Some((u, p)) => (
                Some(u.to_string()).filter(|u| !u.is_empty()),
                Some(SecretString::new(p.to_string())),
            ),
            None => (None, Some(SecretString::new(a.to_string()))),
        },
        None => (None, None),
    };
    Some(RedisUrl {
        addr,
        tls,
        user,
        password,
    })
}

/// The host of `host:port` (`[v6]:port` keeps its brackets off).
#[must_use]
pub fn host_of(addr: &str) -> &str {
    if let Some(v6) = addr.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    match addr.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = parse_url("redis://admin:pw@127.0.0.1:6380/0").unwrap();
        assert_eq!(u.addr, "127.0.0.1:6380");
        assert!(!u.tls);
        assert_eq!(u.user.as_deref(), Some("admin"));
        assert_eq!(u.password.as_ref().map(SecretString::expose), Some("pw"));
        assert_eq!(parse_url("redis://cache").unwrap().addr, "cache:6379");
        let u = parse_url("redis://only-pass@cache").unwrap();
        assert_eq!(u.user, None);
        assert_eq!(
            u.password.as_ref().map(SecretString::expose),
            Some("only-pass")
        );
        let u = parse_url("rediss://app:pw@cache.example.com:6380?x=1").unwrap();
        assert!(u.tls);
        assert_eq!(u.addr, "cache.example.com:6380");
        assert_eq!(parse_url("rediss://[::1]").unwrap().addr, "[::1]:6379");
        assert_eq!(parse_url("redis://[::1]:7000").unwrap().addr, "[::1]:7000");
        assert!(parse_url("http://x").is_none());
        assert!(parse_url("redis://").is_none());
        assert!(parse_url("redis://u:p@/0").is_none());
    }

    #[test]
    fn hosts() {
        assert_eq!(host_of("10.0.0.1:6379"), "10.0.0.1");
        assert_eq!(host_of("cache"), "cache");
        assert_eq!(host_of("[fd00::1]:6379"), "fd00::1");
        assert_eq!(host_of("fd00::1"), "fd00::1");
    }
}
