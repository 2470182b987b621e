//! rekey's envelope parser (binary, and the base64 column form used by the
//! re-encryption codec) on arbitrary input: never a panic; a tampered
//! envelope is refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rekey_keyring::{Keyring, MasterKey};
use rekey_reencrypt::Codec;

fuzz_target!(|data: &[u8]| {
    let current = MasterKey::from_bytes(&[1; 32]).expect("32 bytes");
    let previous = MasterKey::from_bytes(&[2; 32]).expect("32 bytes");
    let ring = Keyring::new(current, vec![previous]);
    let _ = rekey_keyring::envelope_key_id(data);
    let _ = ring.open(data, b"");
    let _ = ring.is_current(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Codec::Rekey.open(ring.current(), text);
    }
    // Round trip, then flip one bit: refused.
    let env = ring.seal(data, b"aad").expect("seal");
    assert_eq!(ring.open(&env, b"aad").expect("open").expose(), data);
    if !env.is_empty() {
        let mut bad = env.clone();
        let i = data.len() % bad.len();
        bad[i] ^= 0x01;
        assert!(ring.open(&bad, b"aad").is_err());
    }
});
