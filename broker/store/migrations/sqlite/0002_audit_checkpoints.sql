-- Signed checkpoints of the audit chain: (sequence, hash) signed with the broker's key.
-- `jws` is the evidence; the other columns repeat its claims for queries. Append-only like
-- the events they vouch for.
CREATE TABLE audit_checkpoints (
    sequence      INTEGER PRIMARY KEY,
    hash          TEXT NOT NULL,
    time          REAL NOT NULL,
    kid           TEXT NOT NULL,
    jws           TEXT NOT NULL,
    prev_sequence INTEGER NOT NULL
);

CREATE TRIGGER audit_checkpoints_no_update
BEFORE UPDATE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'audit checkpoints are append-only');
END;

CREATE TRIGGER audit_checkpoints_no_delete
BEFORE DELETE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'audit checkpoints are append-only');
END;

-- Retention deletes whole checkpointed ranges only: the boundary may only move forward, and
-- only onto a checkpoint, whose hash is where verification of the retained chain starts.
CREATE TRIGGER audit_retention_advances_to_checkpoints
BEFORE UPDATE OF pruned_through ON audit_retention
WHEN NEW.pruned_through < OLD.pruned_through
  OR NEW.pruned_through NOT IN (SELECT sequence FROM audit_checkpoints)
BEGIN
    SELECT RAISE(ABORT, 'retention may only advance to a checkpointed sequence');
END;

-- Retention looks for the first event younger than its cutoff.
CREATE INDEX audit_events_by_time ON audit_events (time_us);
