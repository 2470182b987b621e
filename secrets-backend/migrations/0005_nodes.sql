-- The servers each version's value is on (a JSON array of host:port), for
-- kinds that keep one credential on several servers (Redis replicas,
-- Sentinel, Cluster); '[]' for the others.
ALTER TABLE versions ADD COLUMN nodes TEXT NOT NULL DEFAULT '[]';
