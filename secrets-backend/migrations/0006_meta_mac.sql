-- A MAC over the key and value of each meta row that verification
-- depends on (audit_chain, audit_legacy_through, kek_check), under a key
-- derived from the KEK; '' for the others.
ALTER TABLE meta ADD COLUMN mac TEXT NOT NULL DEFAULT '';
