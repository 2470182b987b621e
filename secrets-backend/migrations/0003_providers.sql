-- Where a secret's values live: '' is rekey's embedded store; otherwise
-- the name of a configured provider and the path there.
ALTER TABLE secrets ADD COLUMN provider TEXT NOT NULL DEFAULT '';
ALTER TABLE secrets ADD COLUMN provider_path TEXT NOT NULL DEFAULT '';

-- A version's value is found through its provider's reference.
ALTER TABLE versions ADD COLUMN value_ref TEXT NOT NULL DEFAULT '';

-- The embedded provider's values, sealed under the KEK and bound to their
-- secret id and version. Rows are written before the version that refers
-- to them, so a reference never dangles.
CREATE TABLE embedded_values (
    secret_id TEXT NOT NULL,
    value_ref TEXT NOT NULL,
    version BIGINT NOT NULL,
    kek_id TEXT NOT NULL,
    value_ct BLOB NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (secret_id, value_ref)
);

INSERT INTO embedded_values (secret_id, value_ref, version, kek_id, value_ct, created_at_ms)
    SELECT secret_id, 'v' || CAST(version AS TEXT), version, kek_id, value_ct, created_at_ms FROM versions;
UPDATE versions SET value_ref = 'v' || CAST(version AS TEXT);
ALTER TABLE versions DROP COLUMN value_ct;
ALTER TABLE versions DROP COLUMN kek_id;
