"""Who is calling, and may it: authentication of service-account assertions, run credentials
and client certificates (authn, assertions, publickeys) and the deny-by-default role and scope
decisions (authz), and the call-rate limits per peer and per principal (throttle).

May import: the shared value modules, `broker.policy.model`, `broker.runs.model`,
`broker.audit.events`, `broker.audit.refusals` and `broker.store` (refusals are audited).
Never `grpc`, `broker.api` or `broker.cli`: the gRPC edge hands authentication what a call
presented.
"""
