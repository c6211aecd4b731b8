-- The coordinator's latency probe writes as well as reads, as an application does: a
-- commit waits for the WAL to be flushed up to it, behind whatever a rotation's batches
-- wrote before it, and a read-only probe does not see that. Each probe connection updates
-- one row of its own (a random slot) in place; the table stays at most 256 small rows.
CREATE TABLE rekey.latency_probe (
    slot      int PRIMARY KEY CHECK (slot BETWEEN 0 AND 255),
    probed_at timestamptz NOT NULL
) WITH (fillfactor = 50);
