//! The HYVVE envelope: what the platform in the key-rotation runbook stores
//! in its credential columns today.
//!
//! ```text
//! base64( salt[64] || iv[16] || authTag[16] || ciphertext )
//! ```
//!
//! AES-256-GCM with a 16-byte IV; the key is PBKDF2-HMAC-SHA256(master key
//! bytes, salt, 100,000 iterations, 32 bytes); the master key is base64 of
//! exactly 32 bytes; the plaintext is UTF-8. Each salt costs one PBKDF2
//! derivation: opening an envelope derives the key of its salt, and a
//! [`Sealer`] seals many values under one salt with a fresh IV each. It is
//! CPU-bound: callers run it on OS threads, never on an async runtime. There is no key id: an
//! envelope is tried against a key and the tag says whether it fits.

use aes_gcm::aead::consts::U16;
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::aes::Aes256;
use aes_gcm::{AesGcm, Nonce, Tag};
use base64::Engine as _;
use ring::pbkdf2;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::{KeyError, MasterKey, SecretBytes};

pub const SALT_LEN: usize = 64;
pub const IV_LEN: usize = 16;
pub const TAG_LEN: usize = 16;
pub const ITERATIONS: u32 = 100_000;

type Aes256Gcm16 = AesGcm<Aes256, U16>;

fn derive(master: &MasterKey, salt: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut key = Zeroizing::new([0u8; 32]);
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        std::num::NonZeroU32::new(ITERATIONS).unwrap_or(std::num::NonZeroU32::MIN),
        salt,
        master.expose_bytes(),
        key.as_mut_slice(),
    );
    key
}

/// Splits the decoded envelope; `None` when it cannot be one.
pub fn parse(text: &str) -> Option<Vec<u8>> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()?;
    (raw.len() >= SALT_LEN + IV_LEN + TAG_LEN).then_some(raw)
}

/// True when `text` has the envelope's shape (base64, long enough). Says
/// nothing about which key sealed it.
pub fn looks_like(text: &str) -> bool {
    parse(text).is_some()
}

/// Opens an envelope with `master`. `KeyError::Decrypt` when the key does
/// not fit (or the data was altered); `Malformed` when it is not an
/// envelope at all.
pub fn open(master: &MasterKey, text: &str) -> Result<SecretBytes, KeyError> {
    Opener::new(master).open(text)
}

/// Seals `plaintext` under `master` with a fresh salt and IV.
pub fn seal(master: &MasterKey, plaintext: &[u8]) -> Result<String, KeyError> {
    Sealer::new(master)?.seal(plaintext)
}

/// Opens envelopes with one master key, keeping the key derived for the
/// last salt: envelopes sealed by one [`Sealer`] share their salt, so a run
/// of them costs one PBKDF2 derivation.
pub struct Opener<'a> {
    master: &'a MasterKey,
    last: Option<([u8; SALT_LEN], Zeroizing<[u8; 32]>)>,
}

impl<'a> Opener<'a> {
    #[must_use]
    pub fn new(master: &'a MasterKey) -> Self {
        Opener { master, last: None }
    }

    /// [`open`], deriving the key only when the salt differs from the
    /// last one's.
    pub fn open(&mut self, text: &str) -> Result<SecretBytes, KeyError> {
        let raw = Zeroizing::new(parse(text).ok_or(KeyError::Malformed("not a HYVVE envelope"))?);
        let (salt, rest) = raw.split_at(SALT_LEN);
        let (iv, rest) = rest.split_at(IV_LEN);
        let (tag, ct) = rest.split_at(TAG_LEN);
        let key = match &self.last {
            Some((s, k)) if s.as_slice() == salt => k,
            _ => {
                let mut s = [0u8; SALT_LEN];
                s.copy_from_slice(salt);
                let k = derive(self.master, salt);
                &self.last.insert((s, k)).1
            }
        };
        let cipher = Aes256Gcm16::new_from_slice(key.as_slice()).map_err(|_| KeyError::Decrypt)?;
        let mut buf = Zeroizing::new(ct.to_vec());
        cipher
            .decrypt_in_place_detached(Nonce::from_slice(iv), b"", &mut buf, Tag::from_slice(tag))
            .map_err(|_| KeyError::Decrypt)?;
        Ok(SecretBytes::new(buf.to_vec()))
    }
}

/// Seals many values under one fresh salt, and so one PBKDF2 derivation,
/// each with a fresh random IV. The envelope format is unchanged (it still
/// carries the salt), so any HYVVE reader opens every value; the trade is
/// one derived key for the values a sealer seals instead of one per value.
pub struct Sealer {
    salt: [u8; SALT_LEN],
    key: Zeroizing<[u8; 32]>,
}

impl Sealer {
    /// A fresh salt and the key derived from it.
    pub fn new(master: &MasterKey) -> Result<Self, KeyError> {
        let mut salt = [0u8; SALT_LEN];
        SystemRandom::new()
            .fill(&mut salt)
            .map_err(|_| KeyError::Random)?;
        let key = derive(master, &salt);
        Ok(Sealer { salt, key })
    }

    /// Seals `plaintext` with this sealer's salt and a fresh IV.
    pub fn seal(&self, plaintext: &[u8]) -> Result<String, KeyError> {
        let mut iv = [0u8; IV_LEN];
        SystemRandom::new()
            .fill(&mut iv)
            .map_err(|_| KeyError::Random)?;
        let cipher =
            Aes256Gcm16::new_from_slice(self.key.as_slice()).map_err(|_| KeyError::Random)?;
        let mut buf = Zeroizing::new(plaintext.to_vec());
        let tag = cipher
            .encrypt_in_place_detached(Nonce::from_slice(&iv), b"", &mut buf)
            .map_err(|_| KeyError::Random)?;
        let mut out = Vec::with_capacity(SALT_LEN + IV_LEN + TAG_LEN + buf.len());
        out.extend_from_slice(&self.salt);
        out.extend_from_slice(&iv);
        out.extend_from_slice(&tag);
        out.extend_from_slice(&buf);
        Ok(base64::engine::general_purpose::STANDARD.encode(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_wrong_key() {
        let a = MasterKey::from_bytes(&[1; 32]).unwrap();
        let b = MasterKey::from_bytes(&[2; 32]).unwrap();
        let env = seal(&a, "sk-test-123".as_bytes()).unwrap();
        assert!(looks_like(&env));
        assert_eq!(open(&a, &env).unwrap().expose(), b"sk-test-123");
        assert_eq!(open(&b, &env).unwrap_err(), KeyError::Decrypt);
        assert!(matches!(
            open(&a, "bm90IGFuIGVudmVsb3Bl"),
            Err(KeyError::Malformed(_))
        ));
        assert!(matches!(open(&a, "%%%"), Err(KeyError::Malformed(_))));
    }

    #[test]
    fn a_sealer_shares_its_salt_and_never_an_iv() {
        let a = MasterKey::from_bytes(&[1; 32]).unwrap();
        let sealer = Sealer::new(&a).unwrap();
        let envs: Vec<String> = (0..20)
            .map(|i| sealer.seal(format!("value-{i}").as_bytes()).unwrap())
            .collect();
        let raw: Vec<Vec<u8>> = envs.iter().map(|e| parse(e).unwrap()).collect();
        assert!(raw.iter().all(|r| r[..SALT_LEN] == raw[0][..SALT_LEN]));
        let mut ivs: Vec<&[u8]> = raw
            .iter()
            .map(|r| &r[SALT_LEN..SALT_LEN + IV_LEN])
            .collect();
        ivs.sort();
        ivs.dedup();
        assert_eq!(ivs.len(), 20, "a fresh IV for every value");
        let mut opener = Opener::new(&a);
        for (i, e) in envs.iter().enumerate() {
            assert_eq!(
                opener.open(e).unwrap().expose(),
                format!("value-{i}").as_bytes()
            );
            assert_eq!(
                open(&a, e).unwrap().expose(),
                format!("value-{i}").as_bytes()
            );
        }
        // Another sealer, another salt.
        let other = Sealer::new(&a).unwrap().seal(b"x").unwrap();
        assert_ne!(parse(&other).unwrap()[..SALT_LEN], raw[0][..SALT_LEN]);
        assert_eq!(opener.open(&other).unwrap().expose(), b"x");
    }
}
