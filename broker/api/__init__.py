"""The transport edge: the gRPC server (server), the servicer that translates protobuf ⇄ domain
(servicer, convert), the call interceptor (request id, caller, error → status: interceptor,
status), what a call presented (credentials), the executor hand-off (handoff), reflection
(reflectionpool), the supervisor of `serve --workers` and its worker processes (workers)
and the HTTP port (http: discovery, JWKS and what else is served over HTTP).

The only package besides `broker.cli` that imports `grpc`. May import the domain and `broker.app`.
"""
