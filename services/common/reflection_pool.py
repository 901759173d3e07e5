"""The descriptor pool server reflection answers from.

With the pinned protobuf (upb backend) `DescriptorPool.FindFileContainingSymbol` raises KeyError
for a method's full name (`deltarec.v1.CollectorService.DeleteItems`), so `grpcurl describe` of a
method failed with "Symbol not found" although services, messages and fields resolved. This pool
delegates to the default one and, for a name the default cannot find, resolves
`<service>.<method>` (and `<message>.<field>`/`<enum>.<value>`-style nested names) through
the parent symbol's file, which is what the reflection protocol asks for.
"""
from __future__ import annotations

from google.protobuf import descriptor_pool


class MethodResolvingPool:
    def __init__(self, pool=None) -> None:
        self._pool = pool or descriptor_pool.Default()

    def FindFileContainingSymbol(self, symbol: str):  # noqa: N802 - the DescriptorPool API
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            parent, _, member = symbol.rpartition(".")
            if not parent:
                raise
            try:
                service = self._pool.FindServiceByName(parent)
            except KeyError:
                service = None
            if service is not None:
                if member in service.methods_by_name:
                    return service.file
                raise
            # A field or nested symbol of a message the pool knows.
            message = self._pool.FindMessageTypeByName(parent)
            if member in message.fields_by_name or member in message.enum_values_by_name:
                return message.file
            raise

    def __getattr__(self, name: str):
        return getattr(self._pool, name)
