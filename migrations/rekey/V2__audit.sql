-- The audit log of key usage: every key operation and, aggregated per batch, every
-- field encryption and decryption.
CREATE TABLE rekey.audit_log (
    id         bigserial PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    key_id     uuid,
    operation  text NOT NULL,
    success    boolean NOT NULL,
    n_ops      bigint NOT NULL DEFAULT 1 CHECK (n_ops >= 0),
    run_id     bigint,
    batch_no   bigint,
    actor      text NOT NULL,
    detail     jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_log_at ON rekey.audit_log (at);
CREATE INDEX audit_log_run ON rekey.audit_log (run_id, batch_no) WHERE run_id IS NOT NULL;
CREATE INDEX audit_log_key ON rekey.audit_log (key_id, operation);
