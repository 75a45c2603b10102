"""Structured output over gRPC on the tiny model: every bad constraint is INVALID_ARGUMENT with the library's message
(and the server keeps serving), streamed deltas add up to the unary text, the limits and counters are in ModelInfo,
RagQuery takes a constraint, and the sync and async clients build every kind of constraint."""

from __future__ import annotations

import asyncio
import json
import re

import grpc
import pytest

from loraserve.client import AsyncClient, LoraserveRpcError, StopReason
from loraserve.client.types import build_constraint
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc
from tests.conftest import HANG_GUARD_S

PERSON = {
    "type": "object",
    "properties": {"name": {"enum": ["Ada", "Alan"]}, "age": {"type": "integer", "minimum": 20, "maximum": 99}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (dict(json_schema='{"type": "object",'), "constraint.json_schema: is not JSON"),
        (dict(json_schema="[]"), "constraint.json_schema: must be a JSON object"),
        (dict(json_schema={"type": "object", "if": {"required": ["a"]}, "then": {}}), "Unimplemented keys"),
        (dict(json_schema={"type": "integer", "minimum": "zero"}), "constraint.json_schema"),
        (dict(regex="[a-z"), "constraint.regex: does not compile"),
        (dict(grammar="start: undefined_rule"), "constraint.grammar: does not compile"),
        (dict(choice=[]), "constraint.choice.values: must list at least one"),
        (dict(choice=["a", ""]), "constraint.choice.values[1]: must not be empty"),
        (dict(regex="x" * 70_000), "at most 65536 are allowed"),
        # Caught before queueing: no token can start them (they would fail at the first step otherwise).
        (dict(regex=r"[^\s\S]"), "constraint.regex: cannot be satisfied: no text can"),
        (dict(grammar="start: /[^\\s\\S]/"), "constraint.grammar: cannot be satisfied"),
        (dict(json_schema={"$ref": "#"}), "constraint.json_schema"),
        # llguidance would offer the special token <|im_end|> for its text, then refuse it (llguidance#366).
        (dict(regex=r"<\|im_end\|>"), "spells the special token <|im_end|>"),
    ],
)
@pytest.mark.parametrize("rpc", ["generate", "stream"])
def test_a_bad_constraint_is_invalid_argument_and_the_server_keeps_serving(tiny_server, rpc, options, fragment) -> None:
    client = tiny_server.client
    with pytest.raises(LoraserveRpcError) as error:
        result = getattr(client, rpc)("hi", max_new_tokens=4, **options)
        if rpc == "stream":
            list(result)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT, error.value
    assert fragment in error.value.details
    assert "Traceback" not in error.value.details
    assert client.health() == "SERVING"
    assert client.generate("hi", choice=["fine"]).text == "fine"


@pytest.mark.parametrize(
    ("constraint", "fragment"),
    [
        (pb.OutputConstraint(), "constraint: set one of json_schema, json_object, regex, choice and grammar"),
        (pb.OutputConstraint(json_object=False), "constraint: must be true"),
    ],
)
def test_an_empty_or_false_constraint_message_is_invalid_argument(tiny_server, constraint, fragment) -> None:
    with grpc.insecure_channel(tiny_server.target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(pb.GenerateRequest(prompt="hi", constraint=constraint), timeout=HANG_GUARD_S)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in error.value.details()


@pytest.mark.parametrize(
    "options",
    [
        dict(json_schema=PERSON),
        dict(regex=r"[A-Z][a-z]{2,6}, [0-9]{4}"),
        dict(choice=["north", "south", "east", "west"]),
        dict(grammar='start: "x = " NUMBER ";"\nNUMBER: /[1-9][0-9]{0,3}/'),
    ],
)
def test_streamed_deltas_add_up_to_the_unary_text_under_a_constraint(tiny_server, options) -> None:
    client = tiny_server.client
    whole = client.generate("Give me one:", max_new_tokens=40, **options)
    chunks = list(client.stream("Give me one:", max_new_tokens=40, **options))
    assert whole.stop_reason is StopReason.CONSTRAINT_COMPLETE
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].stop_reason is StopReason.CONSTRAINT_COMPLETE and chunks[-1].generated_token_count == (
        whole.generated_token_count
    )


def test_json_object_gives_a_json_object(tiny_server) -> None:
    result = tiny_server.client.generate("An object:", json_object=True, max_new_tokens=48)
    if result.stop_reason is StopReason.CONSTRAINT_COMPLETE:
        assert isinstance(json.loads(result.text), dict)
    else:  # cut off: a valid prefix of a JSON object
        assert result.stop_reason is StopReason.MAX_TOKENS and result.text.startswith("{")


def test_model_info_has_the_constraint_limits_and_counters(tiny_server) -> None:
    client = tiny_server.client
    before = client.model_info().stats["constrained_requests"]
    client.generate("hi", choice=["a", "b"])
    info = client.model_info()
    assert info.limits["max_constraint_bytes"] == 65536 and info.limits["max_constraint_choices"] == 1024
    assert info.stats["constrained_requests"] == before + 1
    assert info.stats["constraint_mask_steps"] > 0 and info.stats["constraint_mask_seconds"] > 0


def test_rag_query_answers_under_a_constraint_even_without_a_relevant_passage(tiny_server) -> None:
    documents = [{"id": "fr", "text": "Paris is the capital of France.", "title": "France"}]
    answer = tiny_server.client.rag_query(
        "Is Paris the capital of France?", documents, choice=["yes", "no"], max_new_tokens=8
    )
    assert answer.text in ("yes", "no") and answer.stop_reason is StopReason.CONSTRAINT_COMPLETE
    assert [s.document_id for s in answer.sources] == ["fr"] and not answer.sources[0].cited
    unrelated = tiny_server.client.rag_query("quantum chromodynamics", documents, regex="[0-9]{3}")
    assert re.fullmatch("[0-9]{3}", unrelated.text) and unrelated.sources == ()


def test_the_async_client_takes_the_same_constraints(tiny_server) -> None:
    expected = tiny_server.client.generate("Pick:", choice=["red", "green", "blue"])

    async def main() -> None:
        async with AsyncClient(tiny_server.target, timeout=HANG_GUARD_S) as client:
            result = await client.generate("Pick:", choice=["red", "green", "blue"])
            assert result.text == expected.text and result.stop_reason is StopReason.CONSTRAINT_COMPLETE
            chunks = [c async for c in client.stream("Pick:", json_schema=json.dumps(PERSON), max_new_tokens=40)]
            assert chunks[-1].stop_reason is StopReason.CONSTRAINT_COMPLETE
            assert json.loads("".join(c.text for c in chunks))["name"] in ("Ada", "Alan")

    asyncio.run(main())


def test_the_client_builds_each_kind_of_constraint_and_refuses_two() -> None:
    assert build_constraint({}) is None
    assert json.loads(build_constraint({"json_schema": PERSON}).json_schema) == PERSON
    assert build_constraint({"json_schema": '{"type": "string"}'}).json_schema == '{"type": "string"}'
    assert build_constraint({"json_object": True}).json_object
    assert build_constraint({"regex": "a+"}).regex == "a+"
    assert list(build_constraint({"choice": ("a", "b")}).choice.values) == ["a", "b"]
    assert build_constraint({"grammar": 'start: "a"'}).grammar == 'start: "a"'
    with pytest.raises(TypeError, match="at most one output constraint"):
        build_constraint({"regex": "a", "choice": ["a"]})
    with pytest.raises(TypeError, match="sequence of strings"):
        build_constraint({"choice": "ab"})


def test_a_special_tokens_text_later_in_a_constraint_ends_it_with_a_clear_error(tiny_server) -> None:
    with pytest.raises(LoraserveRpcError) as raised:
        tiny_server.client.generate("Say it", regex=r"a<\|im_end\|>", max_new_tokens=8)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "constraint: cannot be followed further: the text it needs next spells the special token" in str(
        raised.value
    )
    assert tiny_server.client.health() == "SERVING"


@pytest.mark.parametrize("choices", [["\U0001f642"], ["\u65e5\u672c"]])
def test_a_constrained_text_cut_off_inside_a_character_stays_a_prefix_of_the_language(tiny_server, choices) -> None:
    result = tiny_server.client.generate("Hello", choice=choices, max_new_tokens=1)
    assert result.stop_reason == StopReason.MAX_TOKENS
    assert "\ufffd" not in result.text and any(c.startswith(result.text) for c in choices)
