-- The ledger's state machines, enforced by the database as the key store's are: a run, a
-- stage or a batch changes state only along a row of rekey.state_transitions (staying in a
-- state is always allowed), and starts in its initial state. The rows are the table in
-- common/src/ledger/mod.rs; a test holds the two equal.
CREATE TABLE rekey.state_transitions (
    machine     text NOT NULL CHECK (machine IN ('run', 'stage', 'batch')),
    from_state  text NOT NULL,
    to_state    text NOT NULL,
    PRIMARY KEY (machine, from_state, to_state)
);

INSERT INTO rekey.state_transitions (machine, from_state, to_state) VALUES
    ('run', 'planning', 'running'),
    ('run', 'planning', 'failed'),
    ('run', 'running', 'paused'),
    ('run', 'running', 'halted'),
    ('run', 'running', 'completed'),
    ('run', 'running', 'failed'),
    ('run', 'paused', 'running'),
    ('run', 'paused', 'halted'),
    ('run', 'halted', 'running'),
    ('run', 'halted', 'rolled_back'),
    ('run', 'completed', 'rolled_back'),
    ('stage', 'pending', 'running'),
    ('stage', 'running', 'gating'),
    ('stage', 'running', 'breached'),
    ('stage', 'gating', 'running'),
    ('stage', 'gating', 'observing'),
    ('stage', 'gating', 'breached'),
    ('stage', 'observing', 'passed'),
    ('stage', 'observing', 'breached'),
    ('stage', 'breached', 'running'),
    ('batch', 'pending', 'published'),
    ('batch', 'pending', 'done'),
    ('batch', 'pending', 'failed'),
    ('batch', 'published', 'pending'),
    ('batch', 'published', 'done'),
    ('batch', 'published', 'failed'),
    ('batch', 'failed', 'pending');

-- TG_ARGV[0]: the machine; TG_ARGV[1]: its initial state.
CREATE FUNCTION rekey.check_ledger_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.state = TG_ARGV[1] THEN
            RETURN NEW;
        END IF;
        RAISE EXCEPTION 'illegal % state for a new %: % (a new % starts %)',
            TG_ARGV[0], TG_ARGV[0], NEW.state, TG_ARGV[0], TG_ARGV[1]
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.state = OLD.state OR EXISTS (
        SELECT 1 FROM rekey.state_transitions
         WHERE machine = TG_ARGV[0] AND from_state = OLD.state AND to_state = NEW.state
    ) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'illegal % state change: % -> %', TG_ARGV[0], OLD.state, NEW.state
        USING ERRCODE = 'check_violation';
END
$$;

CREATE TRIGGER runs_state_transition
    BEFORE INSERT OR UPDATE OF state ON rekey.runs
    FOR EACH ROW EXECUTE FUNCTION rekey.check_ledger_transition('run', 'planning');
CREATE TRIGGER stages_state_transition
    BEFORE INSERT OR UPDATE OF state ON rekey.stages
    FOR EACH ROW EXECUTE FUNCTION rekey.check_ledger_transition('stage', 'pending');
CREATE TRIGGER batches_state_transition
    BEFORE INSERT OR UPDATE OF state ON rekey.batches
    FOR EACH ROW EXECUTE FUNCTION rekey.check_ledger_transition('batch', 'pending');
