"""Facts the broker and its clients share, each defined once here.

Where a local broker listens unless told otherwise (and so where clients look for it), the
name it reports itself by, and the file in which a broker started without a policy leaves
its development admin's credentials for local clients. Imports nothing: the broker's
domain and settings read it too.
"""

from __future__ import annotations

SERVICE_NAME = "token-broker"
"""The service's name: OpenTelemetry `service.name` by default, the HTTP server header."""

DEFAULT_TARGET = "127.0.0.1:50051"
"""The gRPC address a broker listens on by default, and the clients' default target."""

DEFAULT_HTTP_TARGET = "127.0.0.1:50052"
"""The HTTP address (OIDC discovery, JWKS) a broker listens on by default."""

DEV_CLIENT_FILE = "dev-admin.json"
"""In the data dir of a broker started without --policy: the development admin's account,
key file and audience (see `tokenbroker.credentials.dev_admin_credentials`)."""
