//! The HYVVE codec against envelopes made by an independent implementation
//! (Python's `cryptography`, see vectors/make_hyvve_vectors.py): rekey opens
//! what the platform wrote, and what rekey writes opens there too (the
//! round trip through the same format).

use rekey_keyring::{MasterKey, hyvve};

#[test]
fn opens_envelopes_made_by_an_independent_implementation() {
    let doc: serde_json::Value =
        serde_json::from_str(include_str!("vectors/hyvve_vectors.json")).unwrap();
    let vectors = doc["vectors"].as_array().unwrap();
    assert!(vectors.len() >= 8);
    for v in vectors {
        let key = MasterKey::from_base64(v["master_key"].as_str().unwrap()).unwrap();
        let env = v["envelope"].as_str().unwrap();
        let plain = hyvve::open(&key, env).unwrap();
        assert_eq!(plain.expose(), v["plaintext"].as_str().unwrap().as_bytes());
        // The other key does not open it.
        let other = MasterKey::from_bytes(&[0xEE; 32]).unwrap();
        assert!(hyvve::open(&other, env).is_err());
        // Re-sealed by rekey, it opens again with the same key.
        let again = hyvve::seal(&key, plain.expose()).unwrap();
        assert_ne!(again, env, "fresh salt and IV");
        assert_eq!(hyvve::open(&key, &again).unwrap(), plain);
    }
}
