-- Which master key wraps the data keys, by provider: every master key that wrapped a data
-- key is recorded here when it first does (keys init, new data keys, rotate-master), so
-- that `rekey keys list` / `keys status` can say "local key" or "pkcs11 key 'L' in token
-- 'T' (serial S)" without opening any token. Nothing secret: ids and descriptions only.
-- Master keys used before this table existed were all local (the only provider then).
CREATE TABLE IF NOT EXISTS rekey.master_keys (
    id uuid PRIMARY KEY,
    provider text NOT NULL CHECK (provider IN ('local', 'pkcs11')),
    description text NOT NULL,
    first_used_at timestamptz NOT NULL DEFAULT now()
);
