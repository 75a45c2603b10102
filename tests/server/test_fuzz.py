"""Property-based fuzzing of every RPC, from the protobuf descriptors: arbitrary request messages (extreme numbers,
NaN and infinities, long and odd strings, unknown enum values, nested messages, maps) and bytes that are not a valid
message at all (invalid UTF-8 in string fields, truncated fields). Whatever comes in, the answer is OK or a precise
status, never UNKNOWN or INTERNAL, and the server stays SERVING."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraserve.config import EngineConfig
from loraserve.v1 import inference_pb2 as pb
from tests.conftest import HANG_GUARD_S

# `make test` runs the same 1,000 cases per RPC every time (derandomized: a suite must not fail by chance), in about
# 80 s for all 13 RPCs; LORASERVE_FUZZ_EXAMPLES=N hunts with N fresh random cases per RPC.
HUNT = "LORASERVE_FUZZ_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("LORASERVE_FUZZ_EXAMPLES", "1000"))
SERVICES = ("InferenceService", "AdapterService", "CollectionService")
NEVER = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
MAX_DEPTH = 3

INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def extreme_ints(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [v for v in (low, high, 0, 1, -1, 2, 255, 256, 65536, 2**31 - 1) if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high), st.integers(max(low, -1000), min(high, 1000)))


TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        ["", " ", "\n", "default", "alpha", "../../etc/passwd", "s3://bucket/x", "{}", '{"type":"object"}']
    ),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1000, max_size=5000),
)


def scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in INT_RANGES:
        return extreme_ints(*INT_RANGES[kind])
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, -0.0, 1.0]))
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_STRING:
        return TEXT
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_ENUM:  # known values and unknown ones (proto3 enums are open)
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    raise AssertionError(f"no strategy for {field.full_name}")


def message_values(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Field name -> value for a random subset of the message's fields (one member of each oneof at most)."""
    parts: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            if value.message_type is None:
                parts[field.name] = st.dictionaries(scalar(key), scalar(value), max_size=3)
            continue
        if field.message_type is not None:
            if depth >= MAX_DEPTH or field.message_type.full_name.startswith("google.protobuf."):
                continue
            one = message_values(field.message_type, depth + 1)
        else:
            one = scalar(field)
        repeated = field.is_repeated
        parts[field.name] = st.lists(one, max_size=4) if repeated else one
    chosen = st.lists(st.sampled_from(sorted(parts)), unique=True, max_size=len(parts)) if parts else st.just([])

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        names = draw(chosen)
        seen_oneofs: set[str] = set()
        values = {}
        for name in names:
            oneof = descriptor.fields_by_name[name].containing_oneof
            if oneof is not None and oneof.name in seen_oneofs:
                continue
            if oneof is not None:
                seen_oneofs.add(oneof.name)
            values[name] = draw(parts[name])
        return values

    return build()


def to_message(descriptor: Descriptor, values: dict[str, Any]) -> Any:
    from google.protobuf import message_factory

    cls = message_factory.GetMessageClass(descriptor)
    message = cls()
    for name, value in values.items():
        field = descriptor.fields_by_name[name]
        target = getattr(message, name) if field.is_repeated else None
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            getattr(message, name).update(value)
        elif field.message_type is not None and target is not None:
            for item in value:
                target.add().CopyFrom(to_message(field.message_type, item))
        elif field.message_type is not None:
            getattr(message, name).CopyFrom(to_message(field.message_type, value))
        elif target is not None:
            target.extend(value)
        else:
            setattr(message, name, value)
    return message


def rpcs() -> list[tuple[str, str, Descriptor, bool]]:
    """(service, method, request type, server-streaming) of every RPC in the contract."""
    return [
        (service, method.name, method.input_type, method.server_streaming)
        for service in SERVICES
        for method in pb.DESCRIPTOR.services_by_name[service].methods
    ]


def invoke(channel: grpc.Channel, service: str, method: str, streaming: bool) -> Callable[[bytes], Any]:
    path = f"/loraserve.v1.{service}/{method}"
    identity = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    if streaming:
        stream = channel.unary_stream(path, **identity)
        return lambda data: list(stream(data, timeout=HANG_GUARD_S))
    return lambda data: channel.unary_unary(path, **identity)(data, timeout=HANG_GUARD_S)


def status_of(call: Callable[[bytes], Any], data: bytes) -> grpc.StatusCode:
    try:
        call(data)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


CORRUPTIONS = st.one_of(
    # a string field (field 1 is a string in most requests) holding invalid UTF-8
    st.builds(
        lambda junk: b"\x0a" + bytes([len(junk)]) + junk, st.binary(min_size=1, max_size=20).map(lambda b: b"\xff" + b)
    ),
    st.binary(max_size=64),  # anything at all
    st.builds(lambda n: bytes([0x0A, n]), st.integers(1, 127)),  # a length that runs past the end
)


@pytest.mark.parametrize(
    ("service", "method", "request_type", "streaming"), rpcs(), ids=[f"{s}.{m}" for s, m, _, _ in rpcs()]
)
def test_no_request_gets_unknown_or_internal(fuzz_server, service, method, request_type, streaming) -> None:
    running = fuzz_server
    with grpc.insecure_channel(running.target) as channel:
        call = invoke(channel, service, method, streaming)

        @settings(
            max_examples=EXAMPLES,
            derandomize=not HUNT,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(values=message_values(request_type), corrupted=st.none() | CORRUPTIONS)
        def check(values: dict[str, Any], corrupted: bytes | None) -> None:
            data = corrupted if corrupted is not None else to_message(request_type, values).SerializeToString()
            code = status_of(call, data)
            assert code not in NEVER, (code, values if corrupted is None else corrupted)

        check()
    assert running.client.health() == "SERVING"
    assert running.client.generate("still here", max_new_tokens=1).generated_token_count == 1


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_config, tmp_path_factory):  # type: ignore[no-untyped-def]
    """A tiny-model server with small limits (so that the valid requests among the cases are quick) and an empty
    adapter root."""
    from tests.conftest import RunningServer

    root = tmp_path_factory.mktemp("fuzz-adapters")
    config = EngineConfig(max_new_tokens=4, default_max_new_tokens=2, kv_cache_memory="64MB", max_batch_size=4)
    running = RunningServer(dataclasses.replace(tiny_model_config, adapter_root=str(root)), config)
    yield running
    running.close()
