CREATE TABLE reencryptions (
    secret_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    consumer_id TEXT NOT NULL,
    rows_done BIGINT NOT NULL,
    rows_total BIGINT NOT NULL,
    rate_milli BIGINT NOT NULL,
    finished BIGINT NOT NULL,
    phase TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    PRIMARY KEY (secret_id, version)
);
