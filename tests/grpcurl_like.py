"""What grpcurl does, in Python: discover, describe and call RPCs through server reflection
alone, with a descriptor pool built from the server's answers (no generated stubs)."""

from __future__ import annotations

import json
from typing import Any

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_reflection.v1alpha.reflection_pb2 import ServerReflectionRequest
from grpc_reflection.v1alpha.reflection_pb2_grpc import ServerReflectionStub


class ReflectionClient:
    def __init__(self, channel: grpc.Channel) -> None:
        self._channel = channel
        self._db = ProtoReflectionDescriptorDatabase(channel)
        self.pool = descriptor_pool.DescriptorPool(self._db)

    def list_services(self) -> list[str]:
        """`grpcurl list`"""
        return sorted(self._db.get_services())

    def methods(self, service: str) -> list[str]:
        """`grpcurl list SERVICE`"""
        desc = self.pool.FindServiceByName(service)
        return [f"{service}.{m.name}" for m in desc.methods]

    def file_containing(self, symbol: str) -> None:
        """What grpcurl asks the server first for every symbol it describes, never from a
        cache; KeyError when the server cannot find it ("Symbol not found")."""
        request = ServerReflectionRequest(file_containing_symbol=symbol)
        answers = list(
            ServerReflectionStub(self._channel).ServerReflectionInfo(iter([request]), timeout=10)
        )
        if not answers or answers[0].HasField("error_response"):
            raise KeyError(f"Symbol not found: {symbol}")

    def describe(self, symbol: str) -> Any:
        """`grpcurl describe SYMBOL` for a service, method or message."""
        self.file_containing(symbol)
        try:
            return self.pool.FindServiceByName(symbol)
        except KeyError:
            pass
        try:
            return self.pool.FindMessageTypeByName(symbol)
        except KeyError:
            pass
        service, _, method = symbol.rpartition(".")
        return self.pool.FindServiceByName(service).methods_by_name[method]

    def call(
        self,
        full_method: str,
        request_json: str = "{}",
        metadata: tuple[tuple[str, str], ...] = (),
        timeout: float = 10,
        proto_field_names: bool = False,
    ) -> Any:
        """`grpcurl -d JSON -H ... TARGET SERVICE/METHOD`: the response(s) as JSON dicts
        (with the .proto's field names, as grpcurl prints them, if `proto_field_names`)."""
        service, _, name = full_method.replace("/", ".").rpartition(".")
        method = self.pool.FindServiceByName(service).methods_by_name[name]
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        request = json_format.Parse(request_json, request_cls())
        path = f"/{service}/{name}"
        kwargs: dict[str, Any] = {
            "request_serializer": lambda m: m.SerializeToString(),
            "response_deserializer": response_cls.FromString,
        }
        if method.server_streaming:
            stream = self._channel.unary_stream(path, **kwargs)
            return [
                json.loads(
                    json_format.MessageToJson(m, preserving_proto_field_name=proto_field_names)
                )
                for m in stream(request, metadata=metadata, timeout=timeout)
            ]
        unary = self._channel.unary_unary(path, **kwargs)
        response = unary(request, metadata=metadata, timeout=timeout)
        return json.loads(
            json_format.MessageToJson(response, preserving_proto_field_name=proto_field_names)
        )
