-- Work that one node at a time does for the cluster (the outbox, the sweep of forwards
-- whose node died): whoever holds the lease until `expires_at` (Unix ms).
CREATE TABLE leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT   NOT NULL,
    expires_at  INTEGER NOT NULL
);
