-- The demo application's schema, kept apart from rekey's own tables (schema `demo`,
-- migration history in demo.refinery_schema_history). Encrypted columns hold v1 envelopes.
CREATE SCHEMA IF NOT EXISTS demo;

CREATE TABLE demo.users (
    id          bigint PRIMARY KEY,
    name        text NOT NULL,
    email       bytea,
    phone       bytea,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE demo.agents (
    id             bigint PRIMARY KEY,
    user_id        bigint NOT NULL,
    name           text NOT NULL,
    api_key        bytea,
    system_prompt  bytea
);

CREATE TABLE demo.conversations (
    id        bigint PRIMARY KEY,
    agent_id  bigint NOT NULL,
    title     text NOT NULL,
    body      bytea,
    summary   bytea
);
