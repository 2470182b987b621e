CREATE TABLE secrets (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    options TEXT NOT NULL,
    schedule_spec TEXT NOT NULL DEFAULT '',
    rotation_window_ms BIGINT NOT NULL DEFAULT 0,
    jitter_ms BIGINT NOT NULL DEFAULT 0,
    min_interval_ms BIGINT NOT NULL DEFAULT 0,
    next_override_ms BIGINT NOT NULL DEFAULT 0,
    validation_window_ms BIGINT NOT NULL DEFAULT 0,
    created_at_ms BIGINT NOT NULL,
    current_version BIGINT NOT NULL DEFAULT 0,
    previous_version BIGINT NOT NULL DEFAULT 0,
    pending_version BIGINT NOT NULL DEFAULT 0,
    latest_version BIGINT NOT NULL DEFAULT 0,
    next_rotation_at_ms BIGINT NOT NULL DEFAULT 0,
    last_rotated_at_ms BIGINT NOT NULL DEFAULT 0,
    revision BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX secrets_next_rotation ON secrets (next_rotation_at_ms);

CREATE TABLE versions (
    secret_id TEXT NOT NULL REFERENCES secrets (id),
    version BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    state TEXT NOT NULL,
    revoked_at_ms BIGINT NOT NULL DEFAULT 0,
    kek_id TEXT NOT NULL,
    value_ct BLOB NOT NULL,
    PRIMARY KEY (secret_id, version)
);

CREATE TABLE rotations (
    secret_id TEXT NOT NULL REFERENCES secrets (id),
    target_version BIGINT NOT NULL,
    step TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    actor TEXT NOT NULL,
    request_id TEXT NOT NULL,
    started_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    PRIMARY KEY (secret_id, target_version)
);
CREATE INDEX rotations_step ON rotations (step);

CREATE TABLE request_tokens (
    secret_id TEXT NOT NULL,
    token TEXT NOT NULL,
    input_fp TEXT NOT NULL,
    version BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (secret_id, token)
);

CREATE TABLE consumers (
    consumer_id TEXT NOT NULL,
    secret_id TEXT NOT NULL,
    pod TEXT NOT NULL,
    namespace TEXT NOT NULL,
    identity TEXT NOT NULL,
    version BIGINT NOT NULL,
    healthy BIGINT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    reported_at_ms BIGINT NOT NULL,
    PRIMARY KEY (consumer_id, secret_id)
);
CREATE INDEX consumers_secret ON consumers (secret_id);

CREATE TABLE audit (
    seq BIGINT PRIMARY KEY,
    time_ms BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    secret_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    outcome TEXT NOT NULL,
    request_id TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX audit_secret ON audit (secret_id, seq);

CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
