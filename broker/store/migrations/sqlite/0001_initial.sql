-- Runs: one row per run. Identity columns are immutable (trigger below): history is
-- never overwritten, only the lifecycle columns change.
CREATE TABLE runs (
    run_id             TEXT PRIMARY KEY,
    org                TEXT NOT NULL,
    project            TEXT NOT NULL,
    pipeline           TEXT NOT NULL,
    state              TEXT NOT NULL CHECK (state IN ('active', 'ended', 'expired')),
    create_time        REAL NOT NULL,
    deadline           REAL NOT NULL,
    triggered_via      TEXT NOT NULL,
    on_behalf_of       TEXT,
    permission_ceiling TEXT NOT NULL,
    inputs             TEXT NOT NULL,
    lease_seconds      REAL,
    lease_expire_time  REAL,
    parent_run_id      TEXT NOT NULL DEFAULT '',
    actor_chain        TEXT NOT NULL DEFAULT '[]',
    end_time           REAL,
    end_reason         TEXT NOT NULL DEFAULT '',
    ended_by           TEXT NOT NULL DEFAULT ''
);
CREATE INDEX runs_newest_first ON runs (create_time DESC, run_id DESC);
CREATE INDEX runs_by_state ON runs (state, end_time);

CREATE TRIGGER runs_identity_is_immutable
BEFORE UPDATE OF run_id, org, project, pipeline, create_time, deadline, triggered_via,
                 on_behalf_of, permission_ceiling, inputs, parent_run_id, actor_chain ON runs
BEGIN
    SELECT RAISE(ABORT, 'run identity columns are immutable');
END;

CREATE TRIGGER runs_end_is_final
BEFORE UPDATE OF state ON runs
WHEN OLD.state != 'active'
BEGIN
    SELECT RAISE(ABORT, 'an ended run cannot change state');
END;

CREATE TABLE idempotency_keys (
    scope       TEXT NOT NULL,
    key         TEXT NOT NULL,
    run_id      TEXT NOT NULL REFERENCES runs (run_id),
    fingerprint TEXT NOT NULL,
    PRIMARY KEY (scope, key)
);

-- The audit log: `record` is the canonical JSON that `hash` covers.
CREATE TABLE audit_events (
    sequence  INTEGER PRIMARY KEY,
    record    TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL,
    action    TEXT NOT NULL,
    run_id    TEXT NOT NULL,
    principal TEXT NOT NULL,
    time_us   INTEGER NOT NULL
);

-- Retention may delete only up to `pruned_through`, which it raises first.
CREATE TABLE audit_retention (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    pruned_through INTEGER NOT NULL
);
INSERT INTO audit_retention (id, pruned_through) VALUES (1, 0);

CREATE TRIGGER audit_events_no_update
BEFORE UPDATE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit events are append-only');
END;

CREATE TRIGGER audit_events_delete_only_pruned
BEFORE DELETE ON audit_events
WHEN OLD.sequence > (SELECT pruned_through FROM audit_retention WHERE id = 1)
BEGIN
    SELECT RAISE(ABORT, 'audit events are append-only');
END;

CREATE TABLE signing_keys (
    kid         TEXT PRIMARY KEY,
    alg         TEXT NOT NULL,
    public_jwk  TEXT NOT NULL,
    create_time REAL NOT NULL,
    retire_time REAL
);
