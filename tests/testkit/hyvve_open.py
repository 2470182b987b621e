"""Opens HYVVE envelopes with Python's `cryptography`, an implementation
independent of rekey: reads {"master_key": B64, "envelopes": [...]} on
stdin and prints a JSON list of the plaintexts (null where one does not
open). Format: base64(salt[64] || iv[16] || authTag[16] || ciphertext),
AES-256-GCM, key = PBKDF2-HMAC-SHA256(master key bytes, salt, 100000, 32).
"""
import base64
import json
import sys

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC


def open_envelope(master: bytes, envelope: str):
    raw = base64.b64decode(envelope)
    salt, iv, tag, ct = raw[:64], raw[64:80], raw[80:96], raw[96:]
    key = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=salt, iterations=100_000).derive(master)
    try:
        return AESGCM(key).decrypt(iv, ct + tag, None).decode("utf-8")
    except InvalidTag:
        return None


def main() -> None:
    doc = json.load(sys.stdin)
    master = base64.b64decode(doc["master_key"])
    json.dump([open_envelope(master, e) for e in doc["envelopes"]], sys.stdout)


if __name__ == "__main__":
    main()
