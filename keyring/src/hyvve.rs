//! The HYVVE envelope: what the platform in the key-rotation runbook stores
//! in its credential columns today.
//!
//! ```text
//! base64( salt[64] || iv[16] || authTag[16] || ciphertext )
//! ```
//!
//! AES-256-GCM with a 16-byte IV; the key is PBKDF2-HMAC-SHA256(master key
//! bytes, salt, 100,000 iterations, 32 bytes); the master key is base64 of
//! exactly 32 bytes; the plaintext is UTF-8. Each envelope costs one PBKDF2
//! derivation to open and one to seal, so it is CPU-bound: callers run it
//! on OS threads, never on an async runtime. There is no key id: an
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
    let raw = Zeroizing::new(parse(text).ok_or(KeyError::Malformed("not a HYVVE envelope"))?);
    let (salt, rest) = raw.split_at(SALT_LEN);
    let (iv, rest) = rest.split_at(IV_LEN);
    let (tag, ct) = rest.split_at(TAG_LEN);
    let key = derive(master, salt);
    let cipher = Aes256Gcm16::new_from_slice(key.as_slice()).map_err(|_| KeyError::Decrypt)?;
    let mut buf = Zeroizing::new(ct.to_vec());
    cipher
        .decrypt_in_place_detached(Nonce::from_slice(iv), b"", &mut buf, Tag::from_slice(tag))
        .map_err(|_| KeyError::Decrypt)?;
    Ok(SecretBytes::new(buf.to_vec()))
}

/// Seals `plaintext` under `master` with a fresh salt and IV.
pub fn seal(master: &MasterKey, plaintext: &[u8]) -> Result<String, KeyError> {
    let rng = SystemRandom::new();
    let mut salt = [0u8; SALT_LEN];
    let mut iv = [0u8; IV_LEN];
    rng.fill(&mut salt).map_err(|_| KeyError::Random)?;
    rng.fill(&mut iv).map_err(|_| KeyError::Random)?;
    let key = derive(master, &salt);
    let cipher = Aes256Gcm16::new_from_slice(key.as_slice()).map_err(|_| KeyError::Random)?;
    let mut buf = Zeroizing::new(plaintext.to_vec());
    let tag = cipher
        .encrypt_in_place_detached(Nonce::from_slice(&iv), b"", &mut buf)
        .map_err(|_| KeyError::Random)?;
    let mut out = Vec::with_capacity(SALT_LEN + IV_LEN + TAG_LEN + buf.len());
    out.extend_from_slice(&salt);
    out.extend_from_slice(&iv);
    out.extend_from_slice(&tag);
    out.extend_from_slice(&buf);
    Ok(base64::engine::general_purpose::STANDARD.encode(out))
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
}
