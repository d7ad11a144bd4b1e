-- The Merkle tree over the audit events (broker.audit.merkle): the hash of every full
-- subtree, (level, idx) = the 2^level leaves from idx * 2^level. Leaf i is the event with
-- sequence tree_base + i + 1. Written under the audit_head lock, in the transaction that
-- appends the event completing the subtree; append-only like the events.
CREATE TABLE audit_tree (
    level INTEGER NOT NULL,
    idx   BIGINT NOT NULL,
    hash  BYTEA NOT NULL,
    PRIMARY KEY (level, idx)
);

CREATE TRIGGER audit_tree_no_update
BEFORE UPDATE ON audit_tree
FOR EACH ROW EXECUTE FUNCTION tokenbroker_refuse('the audit tree is append-only');

CREATE TRIGGER audit_tree_no_delete
BEFORE DELETE ON audit_tree
FOR EACH ROW EXECUTE FUNCTION tokenbroker_refuse('the audit tree is append-only');

CREATE TRIGGER audit_tree_no_truncate
BEFORE TRUNCATE ON audit_tree
FOR EACH STATEMENT EXECUTE FUNCTION tokenbroker_refuse('the audit tree is append-only');

-- Events pruned by retention before the tree existed cannot be leaves: the tree starts
-- after them. The broker builds the tree of existing events when it opens the store.
ALTER TABLE audit_retention ADD COLUMN tree_base BIGINT NOT NULL DEFAULT 0;
UPDATE audit_retention SET tree_base = pruned_through WHERE id = 1;
