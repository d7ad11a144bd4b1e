-- The Merkle tree over the audit events (broker.audit.merkle): the hash of every full
-- subtree, (level, idx) = the 2^level leaves from idx * 2^level. Leaf i is the event with
-- sequence tree_base + i + 1. Written in the transaction that appends the event completing
-- the subtree; append-only like the events (retention keeps the nodes: proofs of consistency
-- with old tree heads need them, and they are 32 bytes each).
CREATE TABLE audit_tree (
    level INTEGER NOT NULL,
    idx   INTEGER NOT NULL,
    hash  BLOB NOT NULL,
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;

CREATE TRIGGER audit_tree_no_update
BEFORE UPDATE ON audit_tree
BEGIN
    SELECT RAISE(ABORT, 'the audit tree is append-only');
END;

CREATE TRIGGER audit_tree_no_delete
BEFORE DELETE ON audit_tree
BEGIN
    SELECT RAISE(ABORT, 'the audit tree is append-only');
END;

-- Events pruned by retention before the tree existed cannot be leaves: the tree of such a
-- store starts after them. The broker builds the tree of existing events when it opens the
-- store after this migration (broker.store.treerows.catch_up).
ALTER TABLE audit_retention ADD COLUMN tree_base INTEGER NOT NULL DEFAULT 0;
UPDATE audit_retention SET tree_base = pruned_through WHERE id = 1;
