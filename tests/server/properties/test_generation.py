"""Property tests of the RPCs that generate: Generate, GenerateStream and RagQuery, and every constraint once."""

from __future__ import annotations

import grpc
from hypothesis import given
from hypothesis import strategies as st

from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc
from tests.server.properties.checks import (
    Code,
    call_stream,
    call_unary,
    check_accepted,
    check_generation,
    check_rag_answer,
    check_status,
    first_lines,
    short,
)
from tests.server.properties.conftest import ErrorLog, Served
from tests.server.properties.constraints import CONSTRAINTS, MALFORMED_CONSTRAINTS, Constraint, limit_constraints
from tests.server.properties.strategies import (
    DEADLINES,
    MARKS,
    NO_DEADLINE,
    generation_requests,
    rag_requests,
    run_examples,
)

pytestmark = MARKS


def test_generate(served: Served, channel: grpc.Channel, error_log: ErrorLog) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)

    @run_examples(300)
    @given(
        case=generation_requests(pb.GenerateRequest, served),
        deadline=DEADLINES,
        cancel_after=st.none() | st.none() | st.none() | st.sampled_from([0.0, 0.005, 0.05]),
    )
    def check(
        case: tuple[pb.GenerateRequest, Constraint | None], deadline: float | None, cancel_after: float | None
    ) -> None:
        request, constraint = case
        outcome = call_unary(stub.Generate, request, deadline, cancel_after)
        check_status("Generate", outcome, request, error_log, channel)
        check_accepted(constraint, outcome)
        if outcome.code is Code.OK:
            response = outcome.response
            try:
                check_generation(request, constraint, served.limits, response.text, response, list(response.tokens))
            except AssertionError as error:
                raise AssertionError(f"Generate({short(request)}) -> {short(response)}: {error}") from None

    check()


def test_generate_stream(served: Served, channel: grpc.Channel, error_log: ErrorLog) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)

    @run_examples(200)
    @given(
        case=generation_requests(pb.GenerateStreamRequest, served),
        deadline=DEADLINES,
        cancel_at=st.none() | st.none() | st.integers(0, 6),
    )
    def check(
        case: tuple[pb.GenerateStreamRequest, Constraint | None], deadline: float | None, cancel_at: int | None
    ) -> None:
        request, constraint = case
        outcome = call_stream(stub.GenerateStream, request, deadline, cancel_at)
        check_status("GenerateStream", outcome, request, error_log, channel)
        check_accepted(constraint, outcome)
        if outcome.code is Code.OK:
            chunks = outcome.response
            try:
                assert chunks, "an OK stream without a message"
                assert all(c.stop_reason == pb.STOP_REASON_UNSPECIFIED for c in chunks[:-1]), "a stop reason mid-way"
                tokens = [t for c in chunks for t in c.tokens]
                text = "".join(c.text for c in chunks)
                check_generation(request, constraint, served.limits, text, chunks[-1], tokens)
            except AssertionError as error:
                raise AssertionError(f"GenerateStream({short(request)}) -> {short(chunks)}: {error}") from None

    check()


def test_every_constraint_once(served: Served, channel: grpc.Channel, error_log: ErrorLog) -> None:
    """Each constraint above, greedy and sampled, and cut off after one token, with no deadline: the sampled cases
    cannot be counted on to draw every one of them. All failures are listed together."""
    stub = pb_grpc.InferenceServiceStub(channel)
    failures = []
    for constraint in CONSTRAINTS + MALFORMED_CONSTRAINTS + limit_constraints(served.limits):
        for temperature, max_new_tokens in ((0.0, 8), (1.0, 8), (0.0, 1)):
            request = pb.GenerateRequest(prompt="Hello", constraint=constraint.message())
            request.stopping.max_new_tokens = max_new_tokens
            request.sampling.temperature, request.sampling.seed = temperature, 7
            outcome = call_unary(stub.Generate, request, NO_DEADLINE)
            try:
                check_status("Generate", outcome, request, error_log, channel)
                check_accepted(constraint, outcome)
                if outcome.code is Code.OK:
                    response = outcome.response
                    check_generation(request, constraint, served.limits, response.text, response, [])
            except AssertionError as error:
                failures.append(f"{short(request)}: {first_lines(error)}")
    assert not failures, "\n".join(failures)


def test_rag_query(served: Served, channel: grpc.Channel, error_log: ErrorLog) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)

    @run_examples(100)
    @given(case=rag_requests(served), deadline=DEADLINES)
    def check(case: tuple[pb.RagQueryRequest, Constraint | None], deadline: float | None) -> None:
        request, constraint = case
        outcome = call_unary(stub.RagQuery, request, deadline)
        check_status("RagQuery", outcome, request, error_log, channel)
        check_accepted(constraint, outcome)
        if outcome.code is Code.OK:
            try:
                check_rag_answer(request, constraint, served, outcome.response)
            except AssertionError as error:
                raise AssertionError(f"RagQuery({short(request)}) -> {short(outcome.response)}: {error}") from None

    check()
