"""The run and token domain: what a pipeline run is, how it starts, lives and ends, and the
tokens minted for it.

Owns: the `Run` model and pipeline names (model), permission ladders (permissions), the run
lifecycle and reaper pass (lifecycle), hot run state (registry), ExecuteOnBehalfOf (delegation),
IssueToken/VerifyToken (issuance), JWT minting and checking (tokens), what the policy adds to
step tokens — `sub` templates (subjects), custom claims and AWS session tags (claims) — and the
signing key ring (keys).

May import: the shared value modules (`broker.errors`, `clock`, `ids`, `identity`, `context`,
`limits`),
`broker.store`, `broker.audit.events`, `broker.auth.authz` (the `Authorizer` it is handed) and
`broker.telemetry.observer`. Never `grpc`, `broker.api` or `broker.cli`.
"""
