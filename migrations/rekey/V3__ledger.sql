-- The run / stage / batch ledger. A batch row commits in the same transaction as the rows
-- it describes, so the ledger is the single source of truth for progress.
CREATE TABLE rekey.runs (
    id                bigserial PRIMARY KEY,
    kind              text NOT NULL CHECK (kind IN ('rotation', 'dry_run', 'rollback')),
    state             text NOT NULL CHECK (state IN ('planning', 'running', 'paused', 'halted', 'completed', 'failed', 'rolled_back')),
    target_key_id     uuid NOT NULL REFERENCES rekey.keys (id),
    previous_key_id   uuid REFERENCES rekey.keys (id),
    parent_run_id     bigint REFERENCES rekey.runs (id),
    targets           jsonb NOT NULL,
    stages            int[] NOT NULL DEFAULT '{100}',
    current_stage     int NOT NULL DEFAULT 0,
    batch_size        int NOT NULL CHECK (batch_size > 0),
    seed              bigint NOT NULL,
    settings          jsonb NOT NULL DEFAULT '{}'::jsonb,
    halt_reason       text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    finished_at       timestamptz,
    operator          text NOT NULL DEFAULT ''
);

CREATE TABLE rekey.stages (
    run_id        bigint NOT NULL REFERENCES rekey.runs (id) ON DELETE CASCADE,
    stage_no      int NOT NULL,
    percent       int NOT NULL CHECK (percent BETWEEN 1 AND 100),
    state         text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'running', 'gating', 'observing', 'passed', 'breached')),
    started_at    timestamptz,
    gated_at      timestamptz,
    observe_until timestamptz,
    finished_at   timestamptz,
    gate          jsonb,
    PRIMARY KEY (run_id, stage_no)
);

CREATE TABLE rekey.batches (
    run_id        bigint NOT NULL REFERENCES rekey.runs (id) ON DELETE CASCADE,
    batch_no      bigint NOT NULL,
    stage_no      int NOT NULL DEFAULT 0,
    table_name    text NOT NULL,
    id_lo         bigint NOT NULL,
    id_hi         bigint NOT NULL,
    state         text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'published', 'done', 'failed')),
    attempts      int NOT NULL DEFAULT 0,
    published_at  timestamptz,
    lease_until   timestamptz,
    done_at       timestamptz,
    worker        text,
    n_rows        bigint NOT NULL DEFAULT 0,
    n_values      bigint NOT NULL DEFAULT 0,
    n_rotated     bigint NOT NULL DEFAULT 0,
    n_skipped     bigint NOT NULL DEFAULT 0,
    n_null        bigint NOT NULL DEFAULT 0,
    n_errors      bigint NOT NULL DEFAULT 0,
    error         text,
    PRIMARY KEY (run_id, batch_no),
    CHECK (id_lo <= id_hi)
);
CREATE INDEX batches_open ON rekey.batches (run_id, state) WHERE state <> 'done';

-- Values that failed to decrypt, recorded and left unchanged.
CREATE TABLE rekey.decrypt_errors (
    id            bigserial PRIMARY KEY,
    run_id        bigint REFERENCES rekey.runs (id) ON DELETE CASCADE,
    batch_no      bigint,
    table_name    text NOT NULL,
    column_name   text NOT NULL,
    row_id        text NOT NULL,
    key_id        uuid,
    error_kind    text NOT NULL,
    detected_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (run_id, table_name, column_name, row_id)
);
