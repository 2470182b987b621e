//! The HYVVE envelope parser on arbitrary input: it must never panic, and
//! whatever it accepts under a key must be what that key sealed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rekey_keyring::{MasterKey, hyvve};

fuzz_target!(|data: &[u8]| {
    let key = MasterKey::from_bytes(&[7; 32]).expect("32 bytes");
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = hyvve::looks_like(text);
        let _ = hyvve::open(&key, text);
    }
    // Mutated real envelopes: a flipped byte must be refused, never
    // mis-decrypted. (Sealing costs PBKDF2: keep inputs small.)
    if data.len() <= 64 {
        let env = hyvve::seal(&key, data).expect("seal");
        assert_eq!(hyvve::open(&key, &env).expect("open").expose(), data);
    }
});
