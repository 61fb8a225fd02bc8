-- Forwarding to the owner's service: the state of a push's answer, and the outbox.

-- 'answered': `reply` is final. 'forwarding': waiting for the owner's service.
-- 'late': WeChat got `success`; the reply went (or not) through the customer-service
-- API, see `late_result`. 'failed': the forward failed; a retry may try again.
ALTER TABLE pushes ADD COLUMN status TEXT NOT NULL DEFAULT 'answered';
ALTER TABLE pushes ADD COLUMN late_result TEXT;

-- Pushes handed on in the background: at least once, in order per follower.
CREATE TABLE outbox (
    id          INTEGER PRIMARY KEY,
    account     TEXT    NOT NULL,
    dedup_key   TEXT    NOT NULL,
    follower    TEXT    NOT NULL,
    url         TEXT    NOT NULL,
    payload     TEXT    NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    -- Unix ms of the next attempt.
    next_at     INTEGER NOT NULL,
    -- 'pending', 'delivered' or 'dead' (parked after too many failures).
    state       TEXT    NOT NULL DEFAULT 'pending',
    last_error  TEXT,
    created_at  INTEGER NOT NULL,
    UNIQUE (account, dedup_key, url)
);

CREATE INDEX outbox_due ON outbox (state, next_at);
CREATE INDEX outbox_follower ON outbox (account, follower, state, id);
