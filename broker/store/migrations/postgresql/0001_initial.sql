-- token-broker on PostgreSQL: the same tables and guarantees as the SQLite store.
-- Times are seconds since the epoch (double precision), like the SQLite store's REAL columns.

-- Runs: one row per run. Identity columns are immutable and an ended run stays ended
-- (triggers below): history is never overwritten, only the lifecycle columns change.
CREATE TABLE runs (
    run_id             TEXT PRIMARY KEY,
    org                TEXT NOT NULL,
    project            TEXT NOT NULL,
    pipeline           TEXT NOT NULL,
    state              TEXT NOT NULL CHECK (state IN ('active', 'ended', 'expired')),
    create_time        DOUBLE PRECISION NOT NULL,
    deadline           DOUBLE PRECISION NOT NULL,
    triggered_via      TEXT NOT NULL,
    on_behalf_of       TEXT,
    permission_ceiling TEXT NOT NULL,
    inputs             TEXT NOT NULL,
    lease_seconds      DOUBLE PRECISION,
    lease_expire_time  DOUBLE PRECISION,
    parent_run_id      TEXT NOT NULL DEFAULT '',
    actor_chain        TEXT NOT NULL DEFAULT '[]',
    end_time           DOUBLE PRECISION,
    end_reason         TEXT NOT NULL DEFAULT '',
    ended_by           TEXT NOT NULL DEFAULT ''
);
CREATE INDEX runs_newest_first ON runs (create_time DESC, run_id DESC);
CREATE INDEX runs_by_state ON runs (state, end_time);

CREATE FUNCTION tokenbroker_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%', TG_ARGV[0] USING ERRCODE = 'integrity_constraint_violation';
END;
$$;

CREATE TRIGGER runs_identity_is_immutable
BEFORE UPDATE OF run_id, org, project, pipeline, create_time, deadline, triggered_via,
                 on_behalf_of, permission_ceiling, inputs, parent_run_id, actor_chain ON runs
FOR EACH ROW
WHEN ((OLD.run_id, OLD.org, OLD.project, OLD.pipeline, OLD.create_time, OLD.deadline,
       OLD.triggered_via, OLD.on_behalf_of, OLD.permission_ceiling, OLD.inputs,
       OLD.parent_run_id, OLD.actor_chain)
   IS DISTINCT FROM
      (NEW.run_id, NEW.org, NEW.project, NEW.pipeline, NEW.create_time, NEW.deadline,
       NEW.triggered_via, NEW.on_behalf_of, NEW.permission_ceiling, NEW.inputs,
       NEW.parent_run_id, NEW.actor_chain))
EXECUTE FUNCTION tokenbroker_refuse('run identity columns are immutable');

CREATE TRIGGER runs_end_is_final
BEFORE UPDATE OF state ON runs
FOR EACH ROW WHEN (OLD.state <> 'active')
EXECUTE FUNCTION tokenbroker_refuse('an ended run cannot change state');

CREATE TABLE idempotency_keys (
    scope       TEXT NOT NULL,
    key         TEXT NOT NULL,
    run_id      TEXT NOT NULL REFERENCES runs (run_id),
    fingerprint TEXT NOT NULL,
    PRIMARY KEY (scope, key)
);

-- The audit log: `record` is the canonical JSON that `hash` covers, kept byte for byte (TEXT,
-- not jsonb, which would reorder it).
CREATE TABLE audit_events (
    sequence  BIGINT PRIMARY KEY,
    record    TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL,
    action    TEXT NOT NULL,
    run_id    TEXT NOT NULL,
    principal TEXT NOT NULL,
    time_us   BIGINT NOT NULL
);
CREATE INDEX audit_events_by_time ON audit_events (time_us);

-- The chain's head. Every write transaction locks this one row first (SELECT ... FOR UPDATE),
-- so appends from every replica are serialised and the global sequence stays gapless: the
-- head is read inside the writing transaction, never cached across transactions.
CREATE TABLE audit_head (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    sequence BIGINT NOT NULL,
    hash     TEXT NOT NULL
);
INSERT INTO audit_head (id, sequence, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

-- Retention may delete only up to `pruned_through`, which it raises first.
CREATE TABLE audit_retention (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    pruned_through BIGINT NOT NULL
);
INSERT INTO audit_retention (id, pruned_through) VALUES (1, 0);

CREATE TRIGGER audit_events_no_update
BEFORE UPDATE ON audit_events
FOR EACH ROW EXECUTE FUNCTION tokenbroker_refuse('audit events are append-only');

CREATE FUNCTION tokenbroker_audit_delete_only_pruned() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.sequence > (SELECT pruned_through FROM audit_retention WHERE id = 1) THEN
        RAISE EXCEPTION 'audit events are append-only'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN OLD;
END;
$$;

CREATE TRIGGER audit_events_delete_only_pruned
BEFORE DELETE ON audit_events
FOR EACH ROW EXECUTE FUNCTION tokenbroker_audit_delete_only_pruned();

CREATE TRIGGER audit_events_no_truncate
BEFORE TRUNCATE ON audit_events
FOR EACH STATEMENT EXECUTE FUNCTION tokenbroker_refuse('audit events are append-only');

CREATE TABLE signing_keys (
    kid         TEXT PRIMARY KEY,
    alg         TEXT NOT NULL,
    public_jwk  TEXT NOT NULL,
    create_time DOUBLE PRECISION NOT NULL,
    retire_time DOUBLE PRECISION
);

-- Signed checkpoints of the audit chain; append-only like the events they vouch for.
CREATE TABLE audit_checkpoints (
    sequence      BIGINT PRIMARY KEY,
    hash          TEXT NOT NULL,
    time          DOUBLE PRECISION NOT NULL,
    kid           TEXT NOT NULL,
    jws           TEXT NOT NULL,
    prev_sequence BIGINT NOT NULL
);

CREATE TRIGGER audit_checkpoints_no_update
BEFORE UPDATE ON audit_checkpoints
FOR EACH ROW EXECUTE FUNCTION tokenbroker_refuse('audit checkpoints are append-only');

CREATE TRIGGER audit_checkpoints_no_delete
BEFORE DELETE ON audit_checkpoints
FOR EACH ROW EXECUTE FUNCTION tokenbroker_refuse('audit checkpoints are append-only');

-- Retention deletes whole checkpointed ranges only.
CREATE FUNCTION tokenbroker_retention_advances() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.pruned_through < OLD.pruned_through
       OR NOT EXISTS (SELECT 1 FROM audit_checkpoints WHERE sequence = NEW.pruned_through) THEN
        RAISE EXCEPTION 'retention may only advance to a checkpointed sequence'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER audit_retention_advances_to_checkpoints
BEFORE UPDATE OF pruned_through ON audit_retention
FOR EACH ROW EXECUTE FUNCTION tokenbroker_retention_advances();
