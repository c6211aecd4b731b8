-- A tamper-evident audit log. Every entry carries `hash` = SHA-256(`prev_hash` || its
-- fields) and `prev_id`, the entry it follows, set by a trigger so that no writer can skip
-- it. There are two kinds of chains, so that concurrent batches never wait on each other:
--   'control': one chain for key operations, run events, dead letters and seals; a writer
--     takes the lock of its head row in rekey.audit_head until it commits (such writes are
--     rare and their transactions short);
--   'batch': one chain per batch (run_id, batch_no), written inside the batch's own
--     transaction (which holds the batch's ledger row); the ledger row records the chain's
--     tail in the same transaction, and when a stage's gates pass the coordinator seals the
--     tails of all its batches into the control chain.
-- `rekey audit verify` recomputes every hash and follows every link (FORMAT.md documents
-- the bytes hashed). Entries written before this migration have no hash.
ALTER TABLE rekey.audit_log
    ADD COLUMN chain text NOT NULL DEFAULT 'control' CHECK (chain IN ('control', 'batch')),
    ADD COLUMN prev_id bigint,
    ADD COLUMN prev_hash bytea,
    ADD COLUMN hash bytea;
CREATE INDEX audit_log_prev ON rekey.audit_log (prev_id);

ALTER TABLE rekey.batches
    ADD COLUMN audit_tail_id bigint,
    ADD COLUMN audit_tail bytea,
    ADD COLUMN audit_entries integer;

CREATE TABLE rekey.audit_head (
    chain     text PRIMARY KEY,
    last_id   bigint,
    last_hash bytea
);
INSERT INTO rekey.audit_head (chain) VALUES ('control');

-- One field of the hashed text: '-;' for NULL, else '<characters>:<text>;'.
CREATE FUNCTION rekey.audit_field(t text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN t IS NULL THEN '-;' ELSE length(t) || ':' || t || ';' END
$$;

-- The text an entry's hash covers, after its predecessor's hash.
CREATE FUNCTION rekey.audit_text(e rekey.audit_log) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT 'rekey-audit-v1;'
        || rekey.audit_field(e.id::text)
        || rekey.audit_field(to_char(e.at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'))
        || rekey.audit_field(e.chain)
        || rekey.audit_field(e.prev_id::text)
        || rekey.audit_field(e.key_id::text)
        || rekey.audit_field(e.operation)
        || rekey.audit_field(e.success::text)
        || rekey.audit_field(e.n_ops::text)
        || rekey.audit_field(e.run_id::text)
        || rekey.audit_field(e.batch_no::text)
        || rekey.audit_field(e.actor)
        || rekey.audit_field(e.detail::text)
$$;

CREATE FUNCTION rekey.audit_chain() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    p_id   bigint;
    p_hash bytea;
BEGIN
    IF NEW.chain = 'batch' THEN
        IF NEW.run_id IS NULL OR NEW.batch_no IS NULL THEN
            RAISE EXCEPTION 'a batch audit entry needs run_id and batch_no';
        END IF;
        SELECT id, hash INTO p_id, p_hash FROM rekey.audit_log
         WHERE chain = 'batch' AND run_id = NEW.run_id AND batch_no = NEW.batch_no
         ORDER BY id DESC LIMIT 1;
        IF p_id IS NULL THEN
            p_hash := sha256(convert_to('rekey-audit-v1 batch ' || NEW.run_id || ' ' || NEW.batch_no, 'UTF8'));
        END IF;
    ELSE
        SELECT last_id, last_hash INTO p_id, p_hash FROM rekey.audit_head
         WHERE chain = 'control' FOR UPDATE;
        IF p_id IS NULL THEN
            p_hash := sha256(convert_to('rekey-audit-v1 control', 'UTF8'));
        END IF;
    END IF;
    NEW.prev_id := p_id;
    NEW.prev_hash := p_hash;
    NEW.hash := sha256(p_hash || convert_to(rekey.audit_text(NEW), 'UTF8'));
    IF NEW.chain = 'control' THEN
        UPDATE rekey.audit_head SET last_id = NEW.id, last_hash = NEW.hash WHERE chain = 'control';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER audit_chain BEFORE INSERT ON rekey.audit_log
    FOR EACH ROW EXECUTE FUNCTION rekey.audit_chain();

-- Append-only: rekey never changes or deletes an entry. (An owner can disable this, which
-- is what the hashes are for.)
CREATE FUNCTION rekey.audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'rekey.audit_log is append-only: entry % cannot be %d', OLD.id, lower(TG_OP);
END
$$;
CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON rekey.audit_log
    FOR EACH ROW EXECUTE FUNCTION rekey.audit_append_only();
