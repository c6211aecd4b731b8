-- Who works on a run, so that a stall never looks healthy.
--
-- rekey.drivers: the lease of the process driving a run (rotate, resume, promote --follow,
-- demo). It is live while its heartbeat is younger than its ttl; a second driver is refused
-- while it is live. A driver deletes its row when it stops; a killed one leaves it to lapse.
CREATE TABLE rekey.drivers (
    run_id          bigint PRIMARY KEY REFERENCES rekey.runs (id) ON DELETE CASCADE,
    host            text NOT NULL,
    pid             integer NOT NULL,
    since           timestamptz NOT NULL DEFAULT clock_timestamp(),
    heartbeat_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    ttl_secs        double precision NOT NULL CHECK (ttl_secs > 0),
    -- What the driver sees on the broker: consumers on the batch queue at its last look,
    -- and since when there has been none (NULL: there is one).
    consumers       integer,
    no_consumer_since timestamptz
);

-- rekey.workers: each worker's presence, written every few seconds (a row per worker id).
-- A worker is live while seen_at is recent; a stopped worker deletes its row.
CREATE TABLE rekey.workers (
    worker_id       text PRIMARY KEY,
    host            text NOT NULL,
    version         text NOT NULL,
    -- The fingerprint of the master key the worker holds.
    master_key_id   uuid NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    seen_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    batches_done    bigint NOT NULL DEFAULT 0,
    batches_failed  bigint NOT NULL DEFAULT 0,
    -- Attempts that failed and were tried again (or handed back), since the worker started.
    batches_retried bigint NOT NULL DEFAULT 0,
    -- The last failure: its kind (wrong_master_key, lock_timeout, deadlock, connection,
    -- other) and its text (never a value or key material), and when; cleared by a success.
    last_error_kind text,
    last_error      text,
    last_error_at   timestamptz,
    -- Failures in a row since the last success.
    failing_streak  bigint NOT NULL DEFAULT 0
);
