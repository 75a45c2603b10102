"""Property tests of the RPCs that do not generate: Tokenize, the requests without fields, AdapterService and
CollectionService."""

from __future__ import annotations

from typing import Any

import grpc
from hypothesis import given
from hypothesis import strategies as st

from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc
from tests.server.properties.checks import (
    Code,
    call_unary,
    check_collection_response,
    check_serves,
    check_status,
    first_lines,
    restore_adapters,
    restore_collections,
    short,
)
from tests.server.properties.conftest import ErrorLog, Served
from tests.server.properties.strategies import (
    DEADLINES,
    MARKS,
    NO_DEADLINE,
    adapter_calls,
    collection_calls,
    run_examples,
    tokenize_requests,
)

pytestmark = MARKS
MUTATIONS = ("UpsertDocuments", "DeleteDocuments", "DeleteCollection")


def test_tokenize(served: Served, channel: grpc.Channel, error_log: ErrorLog) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)

    @run_examples(100)
    @given(request=tokenize_requests(served), deadline=DEADLINES)
    def check(request: pb.TokenizeRequest, deadline: float | None) -> None:
        outcome = call_unary(stub.Tokenize, request, deadline)
        check_status("Tokenize", outcome, request, error_log, channel)
        if outcome.code is Code.OK:
            response = outcome.response
            assert response.token_count >= 1, short(request)
            assert len(response.tokens) == (response.token_count if request.return_tokens else 0), short(request)

    check()


def test_the_requests_without_fields(served: Served, channel: grpc.Channel, error_log: ErrorLog) -> None:
    inference = pb_grpc.InferenceServiceStub(channel)
    adapters = pb_grpc.AdapterServiceStub(channel)
    collections = pb_grpc.CollectionServiceStub(channel)
    calls = {
        "ModelInfo": (inference.ModelInfo, pb.ModelInfoRequest()),
        "Ready": (inference.Ready, pb.ReadyRequest()),
        "ListAdapters": (adapters.ListAdapters, pb.ListAdaptersRequest()),
        "ListCollections": (collections.ListCollections, pb.ListCollectionsRequest()),
    }

    @run_examples(20)
    @given(rpc=st.sampled_from(sorted(calls)), deadline=DEADLINES)
    def check(rpc: str, deadline: float | None) -> None:
        method, request = calls[rpc]
        outcome = call_unary(method, request, deadline)
        check_status(rpc, outcome, request, error_log, channel)
        if outcome.code is Code.OK and rpc == "ModelInfo":
            assert outcome.response.limits == served.limits
        if outcome.code is Code.OK and rpc == "ListAdapters":
            ids = [a.id for a in outcome.response.adapters]
            assert len(ids) == len(set(ids)) <= outcome.response.max_adapters, ids

    check()


def test_adapter_service(served: Served, channel: grpc.Channel, error_log: ErrorLog) -> None:
    """A few loads and unloads in a row (up to an eviction), with every kind of id and source, including adapters
    whose configs or weights are extreme or broken; an adapter that loads must then serve a request. Each case starts
    from the adapters the server started with, so that a failure can be replayed and shrunk."""
    admin = pb_grpc.AdapterServiceStub(channel)
    inference = pb_grpc.InferenceServiceStub(channel)
    deadlines = st.sampled_from([NO_DEADLINE, NO_DEADLINE, 0.002, 0.05, 60.0])

    @run_examples(80)
    @given(calls=st.lists(st.tuples(adapter_calls(served), deadlines), min_size=1, max_size=3))
    def check(calls: list[tuple[tuple[str, Any], float | None]]) -> None:
        try:
            for (rpc, request), deadline in calls:
                outcome = call_unary(getattr(admin, rpc), request, deadline)
                check_status(rpc, outcome, request, error_log, channel)
                if outcome.code is Code.OK and rpc == "LoadAdapter":
                    assert outcome.response.adapter.id == request.adapter_id
                    check_serves(inference, request, error_log, channel)
                if outcome.code is Code.OK and rpc == "UnloadAdapter":
                    assert outcome.response.adapter_id == request.adapter_id
        finally:
            restore_adapters(admin)

    check()


def test_every_adapter_folder_once(served: Served, channel: grpc.Channel, error_log: ErrorLog) -> None:
    """Each folder of the adapter root, loaded once with no deadline: it is refused with a documented status, or it
    loads, is listed, and serves a request. All failures are listed together."""
    admin = pb_grpc.AdapterServiceStub(channel)
    inference = pb_grpc.InferenceServiceStub(channel)
    failures = []
    for folder in sorted(p.name for p in served.root.iterdir()):
        request = pb.LoadAdapterRequest(adapter_id="r1", source=folder)
        try:
            outcome = call_unary(admin.LoadAdapter, request, NO_DEADLINE)
            check_status("LoadAdapter", outcome, request, error_log, channel)
            if outcome.code is Code.OK:
                listed = call_unary(admin.ListAdapters, pb.ListAdaptersRequest(), NO_DEADLINE)
                check_status("ListAdapters", listed, pb.ListAdaptersRequest(), error_log, channel)
                check_serves(inference, request, error_log, channel)
        except AssertionError as error:
            failures.append(f"{folder}: {first_lines(error)}")
        finally:
            restore_adapters(admin)
    assert not failures, "\n".join(failures)


def test_collection_service(served: Served, channel: grpc.Channel, error_log: ErrorLog) -> None:
    """A few collection calls in a row; each case starts from the stored collections "docs" and "notes" alone."""
    stub = pb_grpc.CollectionServiceStub(channel)

    @run_examples(60)
    @given(calls=st.lists(st.tuples(collection_calls(served), DEADLINES), min_size=1, max_size=3))
    def check(calls: list[tuple[tuple[str, Any], float | None]]) -> None:
        try:
            for (rpc, request), deadline in calls:
                outcome = call_unary(getattr(stub, rpc), request, deadline)
                check_status(rpc, outcome, request, error_log, channel)
                if outcome.code is Code.OK:
                    check_collection_response(rpc, request, outcome.response)
        finally:
            if any(rpc in MUTATIONS for (rpc, _), _ in calls):
                restore_collections(stub)

    check()
