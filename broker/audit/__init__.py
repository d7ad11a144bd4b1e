"""The audit log: event types and the hash chain (events), signed checkpoints (checkpoints),
replay-then-follow for StreamAudit (feed), checkpointing and retention (keeper), the export
format (export), offline verification (verify) and repeated refusals counted instead of
each written (refusals).

May import: the shared value modules, `broker.runs.model`, `broker.auth.authz`,
`broker.telemetry.observer` and `broker.store`. Never `grpc`, `broker.api` or `broker.cli`.
"""
