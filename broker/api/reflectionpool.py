"""The descriptor pool server reflection answers from.

protobuf's upb pool cannot find the file of a *method* (`FindFileContainingSymbol(
"tokenbroker.v1.TokenBrokerService.IssueToken")` raises KeyError, grpc/grpc#34743), so
`grpcurl describe tokenbroker.v1.TokenBrokerService.IssueToken` would answer "Symbol not
found". This pool resolves a method to its service's file and leaves everything else alone.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor


class MethodResolvingPool:
    """A descriptor pool (the default one unless given) that also finds methods' files."""

    def __init__(self, pool: descriptor_pool.DescriptorPool | None = None) -> None:
        self._pool = pool or descriptor_pool.Default()

    def FindFileContainingSymbol(self, symbol: str) -> FileDescriptor:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service_name, _, method = symbol.rpartition(".")
            try:
                service = self._pool.FindServiceByName(service_name)
            except KeyError:
                service = None
            if service is None or method not in service.methods_by_name:
                raise
            return service.file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)
