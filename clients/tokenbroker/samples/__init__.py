"""Small, real stand-ins used by the demo and the tests: an identity provider, an executor
and an API that verifies step tokens. Not for production."""
