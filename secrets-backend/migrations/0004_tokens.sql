-- Tokens issued through the API: only their SHA-256 digests are kept.
-- prefixes and operations are JSON arrays of strings.
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    identity TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    prefixes TEXT NOT NULL,
    operations TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    expires_at_ms BIGINT NOT NULL DEFAULT 0,
    revoked_at_ms BIGINT NOT NULL DEFAULT 0
);
