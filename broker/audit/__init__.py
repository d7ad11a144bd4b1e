"""The audit log: event types and the hash chain (events), signed checkpoints (checkpoints),
replay-then-follow for StreamAudit (feed), checkpointing and retention (keeper), the export
format (export), offline verification (verify), repeated refusals counted instead of
each written (refusals), the Merkle tree, its signed heads and proofs (merkle, lognote,
treehead), the witness (witness) and the witnesses' cosignatures and quorum (quorum).

May import: the shared value modules, `broker.runs.model`, `broker.auth.authz`,
`broker.telemetry.observer` and `broker.store`. Never `grpc`, `broker.api` or `broker.cli`.
"""
