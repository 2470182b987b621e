"""Writes hyvve_vectors.json: envelopes in the HYVVE format made with an
implementation independent of rekey (Python's `cryptography`).

Format: base64(salt[64] || iv[16] || authTag[16] || ciphertext), AES-256-GCM
with a 16-byte IV, key = PBKDF2-HMAC-SHA256(master key bytes, salt, 100000
iterations, 32 bytes); the master key is base64 of exactly 32 bytes.

Run: python3 make_hyvve_vectors.py > hyvve_vectors.json
"""
import base64
import json
import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC


def seal(master_b64: str, plaintext: str, salt: bytes, iv: bytes) -> str:
    master = base64.b64decode(master_b64)
    assert len(master) == 32
    kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=salt, iterations=100_000)
    key = kdf.derive(master)
    out = AESGCM(key).encrypt(iv, plaintext.encode("utf-8"), None)
    ciphertext, tag = out[:-16], out[-16:]
    return base64.b64encode(salt + iv + tag + ciphertext).decode()


def main() -> None:
    # Deterministic inputs so the file is reproducible.
    keys = [
        base64.b64encode(bytes(range(32))).decode(),
        base64.b64encode(bytes(range(100, 132))).decode(),
    ]
    plaintexts = ["sk-live-0123456789abcdef", "", "ünïcødé ✓ key", "x" * 300]
    vectors = []
    for k_i, key in enumerate(keys):
        for p_i, text in enumerate(plaintexts):
            salt = bytes((k_i * 31 + p_i * 7 + j) % 256 for j in range(64))
            iv = bytes((k_i * 13 + p_i * 5 + j * 3) % 256 for j in range(16))
            vectors.append({"master_key": key, "plaintext": text, "envelope": seal(key, text, salt, iv)})
    print(json.dumps({"format": "hyvve", "vectors": vectors}, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
