-- Forwarding to the owner's service: the state of a push's answer, and the outbox.
-- See migrations/sqlite/0002_forwarding.sql for the meaning of each value.
ALTER TABLE pushes ADD COLUMN status TEXT NOT NULL DEFAULT 'answered';
ALTER TABLE pushes ADD COLUMN late_result TEXT;
CREATE INDEX pushes_forwarding ON pushes (received_at) WHERE status = 'forwarding';

CREATE TABLE outbox (
    id          BIGSERIAL PRIMARY KEY,
    account     TEXT    NOT NULL,
    dedup_key   TEXT    NOT NULL,
    follower    TEXT    NOT NULL,
    url         TEXT    NOT NULL,
    payload     TEXT    NOT NULL,
    attempts    BIGINT  NOT NULL DEFAULT 0,
    next_at     BIGINT  NOT NULL,
    state       TEXT    NOT NULL DEFAULT 'pending',
    last_error  TEXT,
    created_at  BIGINT  NOT NULL,
    UNIQUE (account, dedup_key, url)
);

CREATE INDEX outbox_due ON outbox (state, next_at);
CREATE INDEX outbox_follower ON outbox (account, follower, state, id);
