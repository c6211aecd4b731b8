-- The load test's record of every plaintext it wrote: SHA-256 of the value, so that
-- `rekey-loadtest verify` can prove each value still decrypts to what was written.
-- `corrupt` marks values planted so that they cannot decrypt.
CREATE TABLE demo.plaintext_digests (
    table_name   text NOT NULL,
    column_name  text NOT NULL,
    row_id       bigint NOT NULL,
    digest       bytea NOT NULL,
    corrupt      boolean NOT NULL DEFAULT false,
    PRIMARY KEY (table_name, column_name, row_id)
);
