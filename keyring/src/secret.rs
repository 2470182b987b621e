//! Redacting, zeroizing holders for secret values.

use std::collections::BTreeMap;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

const REDACTED: &str = "[redacted]";

/// Secret bytes: `Debug` prints `[redacted]`, memory is zeroed on drop, and
/// equality is constant-time.
#[derive(Clone, Zeroize, ZeroizeOnDrop, Default)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

impl PartialEq for SecretBytes {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}
impl Eq for SecretBytes {}

/// A secret UTF-8 string: `Debug` prints `[redacted]`, zeroed on drop,
/// constant-time equality.
#[derive(Clone, Zeroize, ZeroizeOnDrop, Default)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(s: String) -> Self {
        Self(s)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

impl PartialEq for SecretString {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}
impl Eq for SecretString {}

/// Compares two byte strings in constant time (for their common length; the
/// length itself is not secret for hashed tokens).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// A secret's value: bytes for single-valued kinds (tokens, keys), or named
/// fields for structured kinds (`username`, `password`, `url`, ...).
#[derive(Clone, PartialEq, Eq)]
pub enum SecretValue {
    Raw(SecretBytes),
    Fields(BTreeMap<String, SecretString>),
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretValue::Raw(_) => f.write_str("Raw([redacted])"),
            SecretValue::Fields(m) => {
                let keys: Vec<&String> = m.keys().collect();
                write!(f, "Fields({keys:?} = [redacted])")
            }
        }
    }
}

impl SecretValue {
    /// Serializes for storage (to be encrypted right away): a tag byte, then
    /// raw bytes or a JSON object. The buffer zeroes itself on drop.
    pub fn to_storage_bytes(&self) -> SecretBytes {
        match self {
            SecretValue::Raw(b) => {
                let mut v = Vec::with_capacity(b.len() + 1);
                v.push(b'r');
                v.extend_from_slice(b.expose());
                SecretBytes::new(v)
            }
            SecretValue::Fields(m) => {
                let plain: BTreeMap<&str, &str> =
                    m.iter().map(|(k, v)| (k.as_str(), v.expose())).collect();
                let mut v = vec![b'f'];
                // Writing into a Vec cannot fail for string maps.
                serde_json::to_writer(&mut v, &plain).unwrap_or_default();
                SecretBytes::new(v)
            }
        }
    }

    /// Inverse of [`SecretValue::to_storage_bytes`].
    pub fn from_storage_bytes(b: &[u8]) -> Option<Self> {
        match b.split_first() {
            Some((b'r', rest)) => Some(SecretValue::Raw(SecretBytes::new(rest.to_vec()))),
            Some((b'f', rest)) => {
                let m: BTreeMap<String, String> = serde_json::from_slice(rest).ok()?;
                Some(SecretValue::Fields(
                    m.into_iter()
                        .map(|(k, v)| (k, SecretString::new(v)))
                        .collect(),
                ))
            }
            _ => None,
        }
    }

    /// True when `needle` occurs in any part of the value; used by tests and
    /// leak checks.
    pub fn contains_bytes(&self, needle: &[u8]) -> bool {
        let hay: Vec<&[u8]> = match self {
            SecretValue::Raw(b) => vec![b.expose()],
            SecretValue::Fields(m) => m.values().map(|v| v.expose().as_bytes()).collect(),
        };
        hay.iter()
            .any(|h| h.windows(needle.len().max(1)).any(|w| w == needle))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let b = SecretBytes::new(b"topsecret".to_vec());
        let s = SecretString::new("topsecret".into());
        let v = SecretValue::Fields([("password".into(), s.clone())].into());
        for out in [format!("{b:?}"), format!("{s:?}"), format!("{v:?}")] {
            assert!(!out.contains("topsecret"), "{out}");
            assert!(out.contains("[redacted]"), "{out}");
        }
    }

    #[test]
    fn storage_round_trip() {
        let raw = SecretValue::Raw(SecretBytes::new(vec![0, 1, 2, 255]));
        let back = SecretValue::from_storage_bytes(raw.to_storage_bytes().expose()).unwrap();
        assert_eq!(raw, back);
        let f = SecretValue::Fields(
            [
                ("username".into(), SecretString::new("app_a".into())),
                ("password".into(), SecretString::new("p\"w".into())),
            ]
            .into(),
        );
        let back = SecretValue::from_storage_bytes(f.to_storage_bytes().expose()).unwrap();
        assert_eq!(f, back);
        assert!(SecretValue::from_storage_bytes(b"x").is_none());
        assert!(SecretValue::from_storage_bytes(b"").is_none());
    }

    #[test]
    fn constant_time_equality() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert_eq!(SecretBytes::new(vec![1]), SecretBytes::new(vec![1]));
        assert_ne!(SecretString::new("a".into()), SecretString::new("b".into()));
    }
}
