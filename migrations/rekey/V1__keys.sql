-- rekey's key store: data keys wrapped by the master key, field keys wrapped by a data key.
CREATE SCHEMA IF NOT EXISTS rekey;

CREATE TABLE rekey.keys (
    id               uuid PRIMARY KEY,
    kind             text NOT NULL CHECK (kind IN ('data', 'field')),
    state            text NOT NULL CHECK (state IN ('pending', 'active', 'decrypt_only', 'retired', 'destroyed')),
    -- nonce (12) || ciphertext (32) || tag (16); NULL once destroyed.
    wrapped_key      bytea CHECK (wrapped_key IS NULL OR length(wrapped_key) = 60),
    -- The master key's fingerprint for data keys, the wrapping data key's id for field keys.
    wrapping_key_id  uuid NOT NULL,
    label            text NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now(),
    activated_at     timestamptz,
    deactivated_at   timestamptz,
    retired_at       timestamptz,
    destroyed_at     timestamptz,
    rotation_due_at  timestamptz NOT NULL,
    encryptions      bigint NOT NULL DEFAULT 0 CHECK (encryptions >= 0),
    nonce_budget     bigint NOT NULL DEFAULT 4294967296 CHECK (nonce_budget > 0),
    CHECK ((state = 'destroyed') = (wrapped_key IS NULL))
);

-- At most one active key per kind, enforced by the database itself.
CREATE UNIQUE INDEX keys_one_active_per_kind ON rekey.keys (kind) WHERE state = 'active';
CREATE INDEX keys_wrapping_key_id ON rekey.keys (wrapping_key_id);

-- Only the legal state transitions, enforced by the database as well as by rekey, so that
-- a hand-written UPDATE cannot move a key into a state it must never reach.
CREATE FUNCTION rekey.check_key_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state = OLD.state THEN
        RETURN NEW;
    END IF;
    IF (OLD.state, NEW.state) IN (
        ('pending', 'active'),
        ('pending', 'retired'),
        ('active', 'decrypt_only'),
        ('decrypt_only', 'active'),
        ('decrypt_only', 'retired'),
        ('retired', 'destroyed')
    ) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'illegal key state transition for key %: % -> %', OLD.id, OLD.state, NEW.state
        USING ERRCODE = 'check_violation';
END
$$;

CREATE TRIGGER keys_state_transition
    BEFORE UPDATE OF state ON rekey.keys
    FOR EACH ROW EXECUTE FUNCTION rekey.check_key_transition();
