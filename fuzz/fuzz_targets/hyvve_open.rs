//! The HYVVE envelope parser on arbitrary input: it must never panic and
//! never accept what the key did not seal. (Each well-formed input costs a
//! PBKDF2 derivation, so most of the speed comes from malformed ones.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use rekey_keyring::{MasterKey, hyvve};

fuzz_target!(|data: &[u8]| {
    let key = MasterKey::from_bytes(&[7; 32]).expect("32 bytes");
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = hyvve::looks_like(text);
        // Random bytes are never a valid tag under this key.
        assert!(hyvve::open(&key, text).is_err());
    }
});
