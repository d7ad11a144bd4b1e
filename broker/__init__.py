"""token-broker: short-lived, run-scoped tokens for CI/CD pipelines."""

__version__ = "0.1.0"
