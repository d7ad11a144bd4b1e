"""Every `token-broker` sub-command (main wires them), with shared flags and errors (common)
and tables/JSON (output).

Commands reach a running broker through the `tokenbroker` client library, like any user;
offline commands open the store through `broker.store`'s factory. May import anything.
"""
