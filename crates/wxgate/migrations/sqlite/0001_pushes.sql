-- Every authentic push, recorded before it is answered.
CREATE TABLE pushes (
    id          INTEGER PRIMARY KEY,
    account     TEXT    NOT NULL,
    -- Recognises WeChat's redeliveries (see Push::dedup_key); unique per account.
    dedup_key   TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    msg_type    TEXT,
    event       TEXT,
    from_user   TEXT,
    to_user     TEXT,
    create_time TEXT,
    encrypted   INTEGER NOT NULL DEFAULT 0,
    -- The decrypted push document, verbatim.
    xml         TEXT    NOT NULL,
    -- JSON object of the fields as WeChat named them, plus derived values.
    fields      TEXT    NOT NULL,
    -- The plain reply XML that was sent; NULL when the answer was `success`.
    reply       TEXT,
    dead_letter INTEGER NOT NULL DEFAULT 0,
    error       TEXT,
    -- Unix milliseconds.
    received_at INTEGER NOT NULL,
    -- How many deliveries of this push arrived (WeChat retries count here).
    deliveries  INTEGER NOT NULL DEFAULT 1,
    UNIQUE (account, dedup_key)
);

CREATE INDEX pushes_received_at ON pushes (received_at);
CREATE INDEX pushes_from_user ON pushes (account, from_user);
