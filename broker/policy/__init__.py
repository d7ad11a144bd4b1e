"""The policy: service accounts, roles, scopes, trusted identity providers and delegation
rules (model), the TOML file format and its validation (file; its `[federation]` tables —
subject templates, custom claims, AWS session tags — in federation), the rules derived for the
domain (rules), atomic reload on SIGHUP (source) and the development policy (dev).

May import: the shared value modules, `broker.runs` value types, `broker.auth.publickeys`,
`broker.audit.events` and `broker.store` (reloads are audited). Never `grpc`, `broker.api` or
`broker.cli`.
"""
