-- Every authentic push, recorded before it is answered (the same columns as SQLite's).
CREATE TABLE pushes (
    id          BIGSERIAL PRIMARY KEY,
    account     TEXT    NOT NULL,
    -- Recognises WeChat's redeliveries (see Push::dedup_key); unique per account, across
    -- every node: this key is the idempotency record of the cluster.
    dedup_key   TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    msg_type    TEXT,
    event       TEXT,
    from_user   TEXT,
    to_user     TEXT,
    create_time TEXT,
    encrypted   BOOLEAN NOT NULL DEFAULT false,
    -- The decrypted push document, verbatim.
    xml         TEXT    NOT NULL,
    -- JSON object of the fields as WeChat named them, plus derived values.
    fields      TEXT    NOT NULL,
    -- The plain reply XML that was sent; NULL when the answer was `success`.
    reply       TEXT,
    dead_letter BOOLEAN NOT NULL DEFAULT false,
    error       TEXT,
    -- Unix milliseconds.
    received_at BIGINT  NOT NULL,
    -- How many deliveries of this push arrived (WeChat retries count here).
    deliveries  BIGINT  NOT NULL DEFAULT 1,
    UNIQUE (account, dedup_key)
);

CREATE INDEX pushes_received_at ON pushes (received_at);
CREATE INDEX pushes_from_user ON pushes (account, from_user);
