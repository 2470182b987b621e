//! Secret-holding types that cannot leak, and rekey's own envelope format.
//!
//! Everything that holds key material or a secret value lives in a type whose
//! `Debug` prints `[redacted]`, which has no `Display`, and whose memory is
//! zeroed on drop. The envelope (`rekey` codec) is AES-256-GCM under a subkey
//! derived with HKDF-SHA256 from a 32-byte master key; its header carries a
//! key id so that a [`Keyring`] of current and previous keys finds the right
//! key without trying each one.
//!
//! Envelope layout (all binary):
//!
//! ```text
//! 0x01 | key id (8 bytes) | nonce (12 bytes) | ciphertext || tag (16 bytes)
//! ```

pub mod hyvve;
mod secret;

pub use secret::{SecretBytes, SecretString, SecretValue, ct_eq};

use base64::Engine as _;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use ring::{hkdf, hmac};
use zeroize::Zeroizing;

/// First byte of every envelope of this format.
pub const ENVELOPE_VERSION: u8 = 1;
const KEY_ID_LEN: usize = 8;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + KEY_ID_LEN + NONCE_LEN;

/// Errors from key parsing and the envelope. None of them carries key
/// material or plaintext.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("a key must be base64 of exactly 32 bytes (got {0})")]
    BadKey(String),
    #[error("not a rekey envelope: {0}")]
    Malformed(&'static str),
    #[error("no key in the keyring has id {0}")]
    UnknownKeyId(String),
    #[error("decryption failed: wrong key or the data was altered")]
    Decrypt,
    #[error("the system random number generator failed")]
    Random,
}

/// A 32-byte AES-256 master key. Zeroed on drop; `Debug` shows only its id.
pub struct MasterKey {
    bytes: Zeroizing<[u8; 32]>,
    id: [u8; KEY_ID_LEN],
    aead: LessSafeKey,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey(id={}, [redacted])", self.id_hex())
    }
}

struct Len32;
impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

impl MasterKey {
    /// Builds a key from exactly 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| KeyError::BadKey(format!("{} bytes", bytes.len())))?;
        let bytes = Zeroizing::new(arr);
        // The key id is a MAC of a fixed label: it names the key without
        // revealing anything usable about it.
        let tag = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, bytes.as_slice()),
            b"rekey key id v1",
        );
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&tag.as_ref()[..KEY_ID_LEN]);
        // A per-key subkey for the envelope, so that the master key itself
        // is never used directly as an AES key.
        let prk =
            hkdf::Salt::new(hkdf::HKDF_SHA256, b"rekey envelope v1").extract(bytes.as_slice());
        let okm = prk
            .expand(&[b"aes-256-gcm"], Len32)
            .map_err(|_| KeyError::Random)?;
        let mut sub = Zeroizing::new([0u8; 32]);
        okm.fill(sub.as_mut_slice()).map_err(|_| KeyError::Random)?;
        let aead = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, sub.as_slice()).map_err(|_| KeyError::Random)?,
        );
        Ok(Self { bytes, id, aead })
    }

    /// Parses base64 (standard alphabet, padding optional) of exactly 32
    /// bytes; surrounding whitespace is ignored. The error never echoes input.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        let decoded = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(text))
                .map_err(|_| KeyError::BadKey("text that is not base64".into()))?,
        );
        Self::from_bytes(&decoded)
    }

    /// A fresh random key.
    pub fn generate() -> Result<Self, KeyError> {
        let mut b = Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(b.as_mut_slice())
            .map_err(|_| KeyError::Random)?;
        Self::from_bytes(b.as_slice())
    }

    /// The key as base64, in a zeroizing string.
    pub fn to_base64(&self) -> SecretString {
        SecretString::new(base64::engine::general_purpose::STANDARD.encode(self.bytes.as_slice()))
    }

    /// The raw key bytes, for callers that derive their own keys from it.
    pub fn expose_bytes(&self) -> &[u8; 32] {
        &self.bytes
    }

    /// The key id as hex: safe to log.
    pub fn id_hex(&self) -> String {
        hex_encode(&self.id)
    }

    /// HMAC-SHA256 under a subkey of this key, for keyed fingerprints that
    /// must not be brute-forced offline (e.g. idempotency input hashes).
    pub fn fingerprint(&self, label: &[u8], data: &[u8]) -> [u8; 32] {
        let k = hmac::Key::new(hmac::HMAC_SHA256, self.bytes.as_slice());
        let mut ctx = hmac::Context::with_key(&k);
        ctx.update(label);
        ctx.update(&[0]);
        ctx.update(data);
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }

    /// Encrypts `plaintext` into an envelope. `aad` is authenticated but not
    /// stored: decryption must present the same bytes (e.g. the secret id and
    /// version, so a ciphertext cannot be moved to another row).
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, KeyError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| KeyError::Random)?;
        let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
        out.push(ENVELOPE_VERSION);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&nonce);
        let mut body = plaintext.to_vec();
        let tag = self
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut body,
            )
            .map_err(|_| KeyError::Random)?;
        out.extend_from_slice(&body);
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Decrypts an envelope sealed under this key.
    pub fn open(&self, envelope: &[u8], aad: &[u8]) -> Result<SecretBytes, KeyError> {
        let (id, nonce, body) = parse(envelope)?;
        if id != self.id {
            return Err(KeyError::UnknownKeyId(hex_encode(&id)));
        }
        let mut buf = Zeroizing::new(body.to_vec());
        let plain = self
            .aead
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .map_err(|_| KeyError::Decrypt)?;
        Ok(SecretBytes::new(plain.to_vec()))
    }
}

/// An envelope split into key id, nonce and ciphertext||tag.
type Parts<'a> = ([u8; KEY_ID_LEN], [u8; NONCE_LEN], &'a [u8]);

/// Splits an envelope into its parts.
fn parse(envelope: &[u8]) -> Result<Parts<'_>, KeyError> {
    if envelope.len() < HEADER_LEN + TAG_LEN {
        return Err(KeyError::Malformed("too short"));
    }
    if envelope[0] != ENVELOPE_VERSION {
        return Err(KeyError::Malformed("unknown version byte"));
    }
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&envelope[1..1 + KEY_ID_LEN]);
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&envelope[1 + KEY_ID_LEN..HEADER_LEN]);
    Ok((id, nonce, &envelope[HEADER_LEN..]))
}

/// The key id named in an envelope's header, as hex.
pub fn envelope_key_id(envelope: &[u8]) -> Result<String, KeyError> {
    parse(envelope).map(|(id, _, _)| hex_encode(&id))
}

/// The current key plus older keys that must still decrypt. Encrypts with
/// current; decrypts with whichever key the envelope names.
#[derive(Debug)]
pub struct Keyring {
    current: MasterKey,
    previous: Vec<MasterKey>,
}

impl Keyring {
    pub fn new(current: MasterKey, previous: Vec<MasterKey>) -> Self {
        Self { current, previous }
    }

    pub fn current(&self) -> &MasterKey {
        &self.current
    }

    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.current.seal(plaintext, aad)
    }

    pub fn open(&self, envelope: &[u8], aad: &[u8]) -> Result<SecretBytes, KeyError> {
        let (id, _, _) = parse(envelope)?;
        std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| k.id == id)
            .ok_or_else(|| KeyError::UnknownKeyId(hex_encode(&id)))?
            .open(envelope, aad)
    }

    /// True when the envelope is already under the current key.
    pub fn is_current(&self, envelope: &[u8]) -> bool {
        matches!(parse(envelope), Ok((id, _, _)) if id == self.current.id)
    }
}

/// Fills a buffer from the system CSPRNG.
pub fn random_bytes(n: usize) -> Result<SecretBytes, KeyError> {
    let mut b = vec![0u8; n];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| KeyError::Random)?;
    Ok(SecretBytes::new(b))
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> MasterKey {
        MasterKey::from_bytes(&[b; 32]).unwrap()
    }

    #[test]
    fn seal_open_round_trip_with_aad() {
        let k = key(7);
        let env = k.seal(b"s3cret value", b"prod/db#3").unwrap();
        assert_eq!(env[0], ENVELOPE_VERSION);
        assert!(!env.windows(12).any(|w| w == b"s3cret value"));
        assert_eq!(
            k.open(&env, b"prod/db#3").unwrap().expose(),
            b"s3cret value"
        );
        assert_eq!(k.open(&env, b"prod/db#4").unwrap_err(), KeyError::Decrypt);
    }

    #[test]
    fn tampering_is_detected() {
        let k = key(7);
        let mut env = k.seal(b"value", b"").unwrap();
        let last = env.len() - 1;
        env[last] ^= 1;
        assert_eq!(k.open(&env, b"").unwrap_err(), KeyError::Decrypt);
        assert!(matches!(
            k.open(&env[..10], b""),
            Err(KeyError::Malformed(_))
        ));
    }

    #[test]
    fn keyring_picks_key_by_id() {
        let old = key(1);
        let env_old = old.seal(b"old row", b"").unwrap();
        let ring = Keyring::new(key(2), vec![key(1)]);
        assert!(!ring.is_current(&env_old));
        assert_eq!(ring.open(&env_old, b"").unwrap().expose(), b"old row");
        let env_new = ring.seal(b"new row", b"").unwrap();
        assert!(ring.is_current(&env_new));
        let only_new = Keyring::new(key(2), vec![]);
        assert!(matches!(
            only_new.open(&env_old, b""),
            Err(KeyError::UnknownKeyId(_))
        ));
    }

    #[test]
    fn base64_keys_must_be_32_bytes_and_errors_do_not_echo() {
        let short = base64::engine::general_purpose::STANDARD.encode([9u8; 16]);
        let e = MasterKey::from_base64(&short).unwrap_err();
        assert_eq!(e, KeyError::BadKey("16 bytes".into()));
        let e = MasterKey::from_base64("not base64 at all!!").unwrap_err();
        assert!(!e.to_string().contains("at all"));
        let k = MasterKey::generate().unwrap();
        let again = MasterKey::from_base64(k.to_base64().expose()).unwrap();
        assert_eq!(k.id_hex(), again.id_hex());
        assert!(!format!("{k:?}").contains(k.to_base64().expose()));
    }

    #[test]
    fn fingerprints_depend_on_key_label_and_data() {
        let a = key(1);
        assert_eq!(a.fingerprint(b"l", b"d"), a.fingerprint(b"l", b"d"));
        assert_ne!(a.fingerprint(b"l", b"d"), a.fingerprint(b"l", b"e"));
        assert_ne!(a.fingerprint(b"l", b"d"), a.fingerprint(b"m", b"d"));
        assert_ne!(a.fingerprint(b"l", b"d"), key(2).fingerprint(b"l", b"d"));
    }
}
