-- Witnesses' cosignatures of the signed tree heads (broker.audit.quorum): one C2SP
-- signature line per witness and tree size, kept so that the checkpoint is served with them.
CREATE TABLE audit_cosignatures (
    tree_size BIGINT NOT NULL,
    root      BYTEA NOT NULL,
    witness   TEXT NOT NULL,
    line      TEXT NOT NULL,
    PRIMARY KEY (tree_size, witness)
);
