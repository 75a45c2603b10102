"""The properties of the property tests: how a call is made and what its outcome must be (a documented status,
health still SERVING, no unexpected error logged, and outputs that keep each RPC's promises), and how a test puts the
server's adapters and collections back between cases."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import TYPE_CHECKING, Any

import grpc
import httpx
import jsonschema
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc
from tests.server.properties.constraints import Constraint
from tests.server.properties.strategies import DOCUMENT_TEXTS, NO_DEADLINE, RUNTIME_IDS

if TYPE_CHECKING:
    from tests.server.properties.conftest import ErrorLog, Served

Code = grpc.StatusCode


# ---- calls and the property ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """How a call ended: its status, its response (a list of messages for a stream), and what the test did to it."""

    code: Code
    details: str = ""
    response: Any = None
    deadline: float | None = None
    cancelled: bool = False


def call_unary(method: Any, request: Any, deadline: float | None, cancel_after: float | None = None) -> Outcome:
    """A unary call with the deadline, or with none at all (no timeout argument); cancelled after a delay if asked."""
    kwargs = {} if deadline is None else {"timeout": deadline}
    try:
        if cancel_after is None:
            return Outcome(Code.OK, response=method(request, **kwargs), deadline=deadline)
        future = method.future(request, **kwargs)
        time.sleep(cancel_after)
        cancelled = future.cancel()
        try:
            return Outcome(Code.OK, response=future.result(), deadline=deadline, cancelled=cancelled)
        except grpc.FutureCancelledError:
            return Outcome(Code.CANCELLED, deadline=deadline, cancelled=True)
    except grpc.RpcError as error:
        return Outcome(error.code(), error.details() or "", deadline=deadline, cancelled=cancel_after is not None)


def call_stream(method: Any, request: Any, deadline: float | None, cancel_at: int | None) -> Outcome:
    """A server-streaming call read to its end, or cancelled after `cancel_at` messages."""
    kwargs = {} if deadline is None else {"timeout": deadline}
    chunks: list[Any] = []
    call = method(request, **kwargs)
    try:
        for chunk in call:
            if cancel_at is not None and len(chunks) == cancel_at:
                call.cancel()
                return Outcome(Code.CANCELLED, response=chunks, deadline=deadline, cancelled=True)
            chunks.append(chunk)
    except grpc.RpcError as error:
        return Outcome(error.code(), error.details() or "", chunks, deadline, cancel_at is not None)
    return Outcome(Code.OK, response=chunks, deadline=deadline)


INFERENCE = {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED}
DOCUMENTED: dict[str, set[Code]] = {
    "Generate": INFERENCE,
    "GenerateStream": INFERENCE,
    "RagQuery": INFERENCE | {Code.FAILED_PRECONDITION},
    "Tokenize": {Code.INVALID_ARGUMENT},
    "ModelInfo": set(),
    "Ready": set(),
    "ListAdapters": set(),
    "LoadAdapter": {
        Code.INVALID_ARGUMENT,
        Code.NOT_FOUND,
        Code.PERMISSION_DENIED,
        Code.ALREADY_EXISTS,
        Code.RESOURCE_EXHAUSTED,
    },
    "UnloadAdapter": {Code.INVALID_ARGUMENT, Code.NOT_FOUND},
    "UpsertDocuments": {Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED},
    "DeleteDocuments": {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION},
    "ListCollections": set(),
    "DeleteCollection": {Code.INVALID_ARGUMENT, Code.NOT_FOUND},
}


def check_status(rpc: str, outcome: Outcome, request: Any, error_log: ErrorLog, channel: grpc.Channel) -> None:
    """The status is OK or one the contract documents for the RPC (DEADLINE_EXCEEDED only with a deadline, CANCELLED
    only when the test cancelled), the server logged no unexpected error, and health is still SERVING."""
    allowed = {Code.OK} | DOCUMENTED[rpc]
    allowed |= {Code.DEADLINE_EXCEEDED} if outcome.deadline is not None else set()
    allowed |= {Code.CANCELLED} if outcome.cancelled else set()
    shown = f"{rpc}({short(request)}) with deadline {outcome.deadline}, cancelled {outcome.cancelled}"
    assert outcome.code in allowed, f"{shown}: {outcome.code.name} {outcome.details!r}; log: {error_log.take()}"
    check_serving(channel, error_log, shown)


def check_serving(channel: grpc.Channel, error_log: ErrorLog, shown: str) -> None:
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert health.status == health_pb2.HealthCheckResponse.SERVING, f"after {shown}: {health}"
    records = error_log.take()
    assert not records, f"{shown}: the server logged unexpected errors: {records}"


def first_lines(error: AssertionError) -> str:
    """An assertion's own message, without pytest's explanation of the expression."""
    return str(error).split("\nassert ")[0]


def short(message: Any) -> str:
    """A request as text, with long strings shortened (a 5,000-character prompt would hide the rest)."""
    text = repr(message) if isinstance(message, dict) else str(message).replace("\n", " ")
    return re.sub(r"(.)\1{40,}", lambda m: f"{m[1]}*{len(m[0])}", text)[:3000]


# ---- generation ------------------------------------------------------------------------------------------------------

ENDINGS_UNDER_A_CONSTRAINT = {
    pb.STOP_REASON_CONSTRAINT_COMPLETE,
    pb.STOP_REASON_MAX_TOKENS,
    pb.STOP_REASON_TOKEN_LIMIT,
    pb.STOP_REASON_TIME_LIMIT,
    pb.STOP_REASON_STOP_SEQUENCE,
}


def check_generation(
    request: Any, constraint: Constraint | None, limits: pb.ServerLimits, text: str, last: Any, tokens: list[Any]
) -> None:
    """What an OK generation promises: a stop reason (not CANCELLED: that is DEADLINE_EXCEEDED), no more tokens than
    asked for, the stop sequence that ended it among the request's, at most top_n alternatives per token, and an
    output in (or cut off in) its constraint's language."""
    reason = last.stop_reason
    assert reason != pb.STOP_REASON_UNSPECIFIED, "an OK generation without a stop reason"
    assert reason != pb.STOP_REASON_CANCELLED, "a cancelled generation (past its deadline) answered OK"
    stopping = request.stopping
    asked = stopping.max_new_tokens if stopping.HasField("max_new_tokens") else limits.default_max_new_tokens
    assert last.generated_token_count <= asked, f"{last.generated_token_count} tokens, asked for at most {asked}"
    if reason == pb.STOP_REASON_MAX_TOKENS:
        assert last.generated_token_count == asked
    if reason == pb.STOP_REASON_STOP_SEQUENCE and hasattr(last, "stop_sequence"):  # RagQueryResponse has none
        assert last.stop_sequence in stopping.stop_sequences
    for token in tokens:
        assert len(token.top_tokens) <= request.response.top_n
    if constraint is None:
        return
    assert reason in ENDINGS_UNDER_A_CONSTRAINT, f"a constrained output ended {pb.StopReason.Name(reason)}"
    if reason == pb.STOP_REASON_CONSTRAINT_COMPLETE and constraint.complete is not None:
        assert constraint.complete(text), f"{text!r} is not in the language of {constraint.fields}"
    if reason != pb.STOP_REASON_CONSTRAINT_COMPLETE and constraint.prefix is not None:
        assert constraint.prefix(text), f"{text!r} (cut off) is no prefix of the language of {constraint.fields}"


def check_accepted(constraint: Constraint | None, outcome: Outcome) -> None:
    """A constraint the contract does not let the server refuse is not refused, before generation or during it."""
    if constraint is None or constraint.refusable or outcome.code is not Code.INVALID_ARGUMENT:
        return
    assert not outcome.details.startswith("constraint"), f"a satisfiable constraint refused: {outcome.details!r}"


# ---- RagQuery --------------------------------------------------------------------------------------------------------

CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


def check_rag_answer(request: pb.RagQueryRequest, constraint: Constraint | None, served: Served, answer: Any) -> None:
    """Sources ranked from 1, at most top_k, each passage the slice of its inline document it says; an answer
    generated exactly when there was something to answer from (or a constraint), every citation naming a source."""
    sources = list(answer.sources)
    assert [s.rank for s in sources] == list(range(1, len(sources) + 1))
    assert len(sources) <= (request.top_k if request.HasField("top_k") else 3)
    inline = {d.id: d.text for d in request.documents}
    for source in sources:
        if not source.collection:
            assert inline[source.document_id][source.start_char : source.end_char] == source.passage
    generated = answer.stop_reason != pb.STOP_REASON_UNSPECIFIED
    assert generated == (bool(sources) or constraint is not None), "an answer without a stop reason, or the reverse"
    if constraint is None and generated:
        cited = {int(n) for match in CITATION.findall(answer.text) for n in re.findall(r"\d+", match)}
        assert cited <= {s.rank for s in sources}, f"the answer cites {cited}, not among the sources"
    if generated:
        request_like = pb.GenerateRequest(stopping=request.stopping)
        check_generation(request_like, constraint, served.limits, answer.text, answer, [])


# ---- adapters and collections ----------------------------------------------------------------------------------------


def check_serves(
    inference: pb_grpc.InferenceServiceStub, load: pb.LoadAdapterRequest, error_log: ErrorLog, channel: grpc.Channel
) -> None:
    """A short request on an adapter that just loaded is served."""
    request = pb.GenerateRequest(prompt="Hello", adapter_id=load.adapter_id)
    request.stopping.max_new_tokens = 2
    outcome = call_unary(inference.Generate, request, NO_DEADLINE)
    shown = f"Generate on {load.adapter_id!r} just loaded from {load.source!r}"
    assert outcome.code is Code.OK, f"{shown}: {outcome.code.name} {outcome.details!r}; log: {error_log.take()}"
    check_serving(channel, error_log, shown)


def restore_adapters(admin: pb_grpc.AdapterServiceStub) -> None:
    """Back to alpha and beta (from the adapter root: the same files), whatever is resident (without ListAdapters,
    which may be failing)."""
    for adapter_id in RUNTIME_IDS[0]:
        try:
            admin.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id=adapter_id), timeout=60)
        except grpc.RpcError as error:
            assert error.code() is Code.NOT_FOUND, error
    for adapter_id in ("alpha", "beta"):
        admin.LoadAdapter(pb.LoadAdapterRequest(adapter_id=adapter_id, source=adapter_id), timeout=60)


def check_collection_response(rpc: str, request: Any, response: Any) -> None:
    if rpc == "UpsertDocuments":
        assert response.upserted_documents == len(request.documents), short(request)
        assert response.collection.name == request.collection
        assert response.collection.document_count >= response.upserted_documents
    if rpc == "DeleteDocuments":
        assert response.deleted_documents <= len(set(request.document_ids)), short(request)
    if rpc == "ListCollections":
        names = [c.name for c in response.collections]
        assert len(names) == len(set(names)), names


def restore_collections(stub: pb_grpc.CollectionServiceStub) -> None:
    for collection in stub.ListCollections(pb.ListCollectionsRequest(), timeout=60).collections:
        stub.DeleteCollection(pb.DeleteCollectionRequest(name=collection.name), timeout=60)
    for name, texts in (("docs", DOCUMENT_TEXTS[:3]), ("notes", DOCUMENT_TEXTS[3:])):
        stored = [pb.Document(id=f"d{i}", text=text, title=name) for i, text in enumerate(texts)]
        stub.UpsertDocuments(pb.UpsertDocumentsRequest(collection=name, documents=stored), timeout=60)


# ---- the OpenAI-compatible HTTP API ----------------------------------------------------------------------------------

HTTP_STATUSES = {200, 400, 404, 413, 429}  # 503 only while draining, 504 only past a deadline: neither here


def is_json_output(text: str, response_format: dict[str, Any] | None) -> bool:
    document = json.loads(text)
    if response_format and response_format["type"] == "json_object":
        assert isinstance(document, dict)
    if response_format and response_format["type"] == "json_schema":
        jsonschema.validate(document, response_format["json_schema"]["schema"])
    return True


def check_http_choices(body: dict[str, Any], choices: list[dict[str, Any]], chat: bool, streamed: bool) -> None:
    """Every choice there, ended for a reason OpenAI knows; a JSON output that ended "stop" with no stop sequences
    is JSON of its format; log-probabilities (of a whole response) as asked for."""
    prompts = 1 if chat or isinstance(body["prompt"], str) else len(body["prompt"])
    assert sorted(c["index"] for c in choices) == list(range(body.get("n", 1) * prompts))
    wants_json = (body.get("response_format") or {}).get("type", "text") != "text" and not body.get("stop")
    for item in choices:
        assert item["finish_reason"] in ("stop", "length"), item
        if wants_json and item["finish_reason"] == "stop":
            assert is_json_output(item["text"], body.get("response_format"))
        if not streamed:
            check_logprobs(body, item["logprobs"], chat)


def check_logprobs(body: dict[str, Any], logprobs: dict[str, Any] | None, chat: bool) -> None:
    """Log-probabilities exactly when asked for, with at most the number of alternatives asked for."""
    asked = bool(body.get("logprobs")) if chat else body.get("logprobs") is not None
    assert (logprobs is not None) == asked, logprobs
    if chat and asked:
        assert all(len(t["top_logprobs"]) <= (body.get("top_logprobs") or 0) for t in logprobs["content"])
    if not chat and asked:
        assert all(len(top) <= body["logprobs"] for top in logprobs["top_logprobs"])


def read_events(response: httpx.Response) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """A stream's events, and its error event if it ended with one; it must end with [DONE] otherwise."""
    events, done = [], False
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        assert not done, "an event after [DONE]"
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            done = True
            continue
        event = json.loads(data)
        if "error" in event:
            return events, event
        events.append(event)
    assert done, "a stream that ended without [DONE] or an error"
    return events, None


def check_error_body(status: int, error: dict[str, Any]) -> None:
    """OpenAI's error shape, and never a server error."""
    assert set(error) == {"error"} and isinstance(error["error"]["message"], str) and error["error"]["message"]
    assert {"type", "param", "code"} <= set(error["error"])
    assert error["error"]["type"] != "server_error", (status, error)


def check_http(served: Served, client: httpx.Client, body: dict[str, Any], chat: bool) -> None:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    content = json.dumps(body)  # NaN and Infinity as Python writes them, as some clients send them
    headers = {"content-type": "application/json"}
    with client.stream("POST", path, content=content, headers=headers) as response:
        shown = f"POST {path} {short(body)}"
        assert response.status_code in HTTP_STATUSES, f"{shown}: {response.status_code} {response.read()!r}"
        if response.status_code != 200:
            check_error_body(response.status_code, json.loads(response.read()))
            return
        if not body.get("stream"):
            result = json.loads(response.read())
            choices = [c | {"text": c["message"]["content"]} if chat else c for c in result["choices"]]
            check_http_choices(body, choices, chat, streamed=False)
            return
        events, error = read_events(response)
    if error is not None:
        check_error_body(200, error)
        return
    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    for chunk in events:
        for item in chunk["choices"]:
            delta = item["delta"].get("content", "") if chat else item["text"]
            texts[item["index"]] = texts.get(item["index"], "") + delta
            if item["finish_reason"] is not None:
                finished[item["index"]] = item["finish_reason"]
    whole = [{"index": i, "text": texts.get(i, ""), "finish_reason": reason} for i, reason in finished.items()]
    check_http_choices(body, whole, chat, streamed=True)
