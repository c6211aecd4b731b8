-- Staged rollout, rollback and evidence.
-- A rollback run re-encrypts only values under these keys (NULL: any key but the target).
ALTER TABLE rekey.runs ADD COLUMN source_key_ids uuid[];
-- A sweep batch covers every stage up to its own (stragglers of earlier stages included);
-- a normal batch covers only its stage's slice of records.
ALTER TABLE rekey.batches ADD COLUMN cumulative boolean NOT NULL DEFAULT false;
-- Evidence reports, kept in the database as well as in exports/rotation_reports/ (the
-- playbook asks for a year of retention); one row per writing, the newest is current.
CREATE TABLE rekey.reports (
    id          bigserial PRIMARY KEY,
    run_id      bigint NOT NULL REFERENCES rekey.runs (id) ON DELETE CASCADE,
    written_at  timestamptz NOT NULL DEFAULT now(),
    reason      text NOT NULL,
    report      jsonb NOT NULL
);
CREATE INDEX reports_run ON rekey.reports (run_id, id);
