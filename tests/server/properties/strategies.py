"""The hypothesis strategies of the property tests (valid requests with edge values in every field), and how many
cases each test runs."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from loraserve.v1 import inference_pb2 as pb
from tests.server.properties.constraints import (
    CONSTRAINTS,
    MALFORMED_CONSTRAINTS,
    PERSON,
    Constraint,
    limit_constraints,
)

if TYPE_CHECKING:
    from tests.server.properties.conftest import Served

# `make test` runs the same cases every time (derandomized: a suite must not fail by chance), about a minute for the
# folder; LORASERVE_PROPERTY_EXAMPLES=N hunts with N fresh random cases per test (no time limit).
HUNT = "LORASERVE_PROPERTY_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("LORASERVE_PROPERTY_EXAMPLES", "0"))
# Each test file's `pytestmark`. The in-process server's threads draw from the global `random` (OpenTelemetry's
# exemplar reservoir, on each RPC) while hypothesis generates the next case, which it would take for a strategy using
# `random`.
MARKS = [pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")]
if HUNT:
    MARKS.append(pytest.mark.timeout(0))

NO_DEADLINE = None


def run_examples(weight: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The settings of a property: `weight` fixed cases in `make test`, or the hunt's number of fresh ones."""
    return settings(
        max_examples=EXAMPLES or weight,
        derandomize=not HUNT,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


# ---- edge values -----------------------------------------------------------------------------------------------------
# Each field has usual values (in range, edges of the range included) and edge values (out of range, NaN, the limits of
# the field's type). A case is either strict (usual values only: it reaches the engine) or loose (any value).

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
UINT32_MAX, UINT64_MAX = 2**32 - 1, 2**64 - 1
HUGE = [1.7976931348623157e308, 3.4e38, math.inf, -math.inf, math.nan]
# float32 turns 5e-324 and 1e-310 into 0 and keeps 1e-40 as a subnormal
TEMPERATURES = ([0.0, -0.0, 5e-324, 1e-310, 2e-5, 0.7, 1.0, 2.0, 100.0], [1e-40, 1e-5, 1e-6, 100.5, -1.0, *HUGE])
TOP_PS = ([1e-40, 1e-30, 0.5, 0.999, 1.0], [0.0, -0.0, 5e-324, 1e-310, 1.0000001, -0.5, *HUGE])
PENALTIES = ([0.011, 0.5, 1.0, 1.3, 100.0], [0.0, -0.0, 5e-324, 1e-40, 1e-310, 0.01, 101.0, -1.0, *HUGE])
SIMILARITIES = ([-1.0, -0.0, 0.0, 1e-40, 0.3, 1.0], [-1.0000001, 1.0000001, *HUGE])
SEEDS = st.sampled_from([0, 1, 2**31, 2**63 - 1, 2**63, UINT64_MAX]) | st.integers(0, UINT64_MAX)
USUAL_TEXTS = [
    "Hello",
    "Once upon a time",
    "What is 2+2?",
    "\x00",
    "a\x00b",
    "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|>",
    "{{ raise_exception('x') }}",
    "{% for x in range(99999999) %}{% endfor %}",
    "日本語のテキスト",
    "🙂" * 20,
    "e\u0301\u0301\u0301",
    "\u202e\ufeff\u200b!",
    "\U0010ffff",
]
TEXTS = st.sampled_from(USUAL_TEXTS) | st.text(st.characters(codec="utf-8"), min_size=1, max_size=30)
BLANK_TEXTS = st.sampled_from(["", " ", "\n\t ", "\u3000", "\x85"])
LOOSE = st.sampled_from([False, False, False, True])  # three cases in four are strict


def values(usual: list[Any] | st.SearchStrategy[Any], edge: list[Any], loose: bool) -> st.SearchStrategy[Any]:
    """A field's value: usual ones, and in a loose case the edge ones too; unset (None) a third of the time."""
    strategy = usual if isinstance(usual, st.SearchStrategy) else st.sampled_from(usual)
    if loose and edge:
        strategy = strategy | st.sampled_from(edge)
    return st.none() | strategy | strategy


def near(limit: int, fill: str = "x", over: bool = True) -> st.SearchStrategy[str]:
    """Texts just under and at a character limit, and (`over`) just over it."""
    return st.sampled_from([limit - 1, limit, limit + 1][: 3 if over else 2]).map(lambda n: (fill * n)[:n])


def set_fields(message: Any, fields: dict[str, Any]) -> Any:
    for name, value in fields.items():
        if value is not None:
            setattr(message, name, value)
    return message


# ---- output constraints ----------------------------------------------------------------------------------------------


def constraints(limits: pb.ServerLimits, loose: bool) -> st.SearchStrategy[Constraint | None]:
    at_limits = limit_constraints(limits)
    edge = MALFORMED_CONSTRAINTS + at_limits if loose else [c for c in at_limits if not c.refusable]
    return st.none() | st.none() | st.sampled_from(CONSTRAINTS) | st.sampled_from(edge)


# ---- requests --------------------------------------------------------------------------------------------------------

ROLES = (["system", "user", "assistant", "user"], ["developer", "tool", "", "User", "\x00"])
ADAPTER_IDS = (["", "", "", "alpha", "beta"], ["r1", "r2", "unknown", "ALPHA", "../alpha", "a" * 65, "\x00", " alpha"])


def conversations(loose: bool) -> st.SearchStrategy[list[pb.Message]]:
    """Conversations of any shape: system-only, assistant-first, two user turns in a row, ..."""
    roles = st.sampled_from(ROLES[0] + (ROLES[1] if loose else []))
    contents = TEXTS | BLANK_TEXTS if loose else TEXTS
    shapes = [
        [("system", "Be brief.")],
        [("assistant", "Hi.")],
        [("user", "Hi."), ("user", "Again?")],
        [("assistant", "Hi."), ("user", "Hello")],
        [("system", "A"), ("system", "B"), ("user", "C")],
        [("user", "Hi."), ("assistant", "Hello!")],
    ]
    fixed = st.sampled_from(shapes).map(lambda pairs: [pb.Message(role=r, content=c) for r, c in pairs])
    return st.lists(st.builds(pb.Message, role=roles, content=contents), min_size=1, max_size=5) | fixed


def inputs(served: Served, loose: bool) -> st.SearchStrategy[dict[str, Any]]:
    """A prompt (short, or about as long as the context in tokens or characters) or a conversation; in a loose
    case also both, neither, or a blank prompt."""
    context = served.max_sequence_length
    long = st.sampled_from([120, context - 2, context - 1, context, context + 50]).map(lambda n: "word " * n)
    prompts = TEXTS | TEXTS | TEXTS | long | near(served.max_input_chars, over=loose)
    usual = st.builds(lambda p: {"prompt": p}, prompts) | st.builds(lambda m: {"messages": m}, conversations(loose))
    if not loose:
        return usual
    both = st.builds(lambda p, m: {"prompt": p, "messages": m}, TEXTS, conversations(loose))
    return usual | both | st.just({}) | st.builds(lambda p: {"prompt": p}, BLANK_TEXTS)


def sampling(served: Served, loose: bool) -> st.SearchStrategy[pb.SamplingParams | None]:
    vocab = served.vocab_size
    fields = {
        "temperature": values(
            st.sampled_from(TEMPERATURES[0]) | st.floats(2**-10, 2, width=32), TEMPERATURES[1], loose
        ),
        "top_k": values([0, 1, 2, 40, vocab - 1, vocab, vocab + 1, INT32_MAX], [-1, INT32_MIN], loose),
        "top_p": values(st.sampled_from(TOP_PS[0]) | st.floats(0, 1, width=32, exclude_min=True), TOP_PS[1], loose),
        "seed": values(SEEDS, [], loose),
        "repetition_penalty": values(PENALTIES[0], PENALTIES[1], loose),
    }
    return st.none() | st.fixed_dictionaries(fields).map(lambda v: set_fields(pb.SamplingParams(), v))


def stopping(limits: pb.ServerLimits, loose: bool) -> st.SearchStrategy[pb.StoppingCriteria | None]:
    top, length, count = limits.max_new_tokens, limits.max_stop_sequence_length, limits.max_stop_sequences
    fields = {
        "max_new_tokens": values(st.integers(1, 8) | st.just(top), [0, top + 1, 2**31, UINT32_MAX], loose),
        "min_new_tokens": values(st.integers(0, 3), [top, top + 1, UINT32_MAX], loose),
        "time_limit_ms": values([1, 5, 1000, UINT32_MAX], [0], loose),
        "include_stop_sequence": values(st.booleans(), [], loose),
    }
    usual_stops = [" ", "\n", "the", "a", ".", "日本", "\x00", "x" * length]
    stops = st.sampled_from(usual_stops + (["", "x" * (length + 1)] if loose else []))
    lists = st.lists(stops, max_size=3) | st.just(["zz"] * count)
    if loose:
        lists |= st.just(["zz"] * (count + 1))

    def build(chosen: dict[str, Any], sequences: list[str]) -> pb.StoppingCriteria:
        return set_fields(pb.StoppingCriteria(stop_sequences=sequences), chosen)

    return st.none() | st.builds(build, st.fixed_dictionaries(fields), lists)


def response_options(limits: pb.ServerLimits, loose: bool) -> st.SearchStrategy[pb.ResponseOptions | None]:
    fields = {
        "token_ids": values(st.booleans(), [], loose),
        "logprobs": values(st.booleans(), [], loose),
        "top_n": values([0, 1, limits.max_top_n], [limits.max_top_n + 1, UINT32_MAX], loose),
        "input_tokens": values(st.booleans(), [], loose),
    }
    return st.none() | st.fixed_dictionaries(fields).map(lambda v: set_fields(pb.ResponseOptions(), v))


def copy_in(request: Any, name: str, value: Any) -> None:
    if value is not None:
        getattr(request, name).CopyFrom(value)


@st.composite
def generation_requests(draw: st.DrawFn, cls: type, served: Served) -> tuple[Any, Constraint | None]:
    """A GenerateRequest or GenerateStreamRequest, with the constraint it carries (for checking the output)."""
    loose, limits, context = draw(LOOSE), served.limits, served.max_sequence_length
    request = cls(**draw(inputs(served, loose)))
    request.adapter_id = draw(st.sampled_from(ADAPTER_IDS[0] + (ADAPTER_IDS[1] if loose else [])))
    copy_in(request, "sampling", draw(sampling(served, loose)))
    copy_in(request, "stopping", draw(stopping(limits, loose)))
    copy_in(request, "response", draw(response_options(limits, loose)))
    truncate = draw(values([0, 1, 2, 100, context - 1, context, UINT32_MAX], [], loose))
    if truncate is not None:
        request.truncate_input_tokens = truncate
    constraint = draw(constraints(limits, loose))
    if constraint is not None:
        request.constraint.CopyFrom(constraint.message())
    return request, constraint


DEADLINES = st.sampled_from([NO_DEADLINE, NO_DEADLINE, 0.002, 0.05, 0.5, 60.0])


# ---- RagQuery --------------------------------------------------------------------------------------------------------

COLLECTIONS = (["docs", "notes", "a" * 64], ["", "a" * 65, "../x", ".", "日本", "x y", "x/y", "\x00", "missing"])
DOCUMENT_TEXTS = [
    "Paris is the capital of France. It has 2.1 million inhabitants.",
    "The Nile is the longest river in Africa.\n\nIt flows north into the Mediterranean Sea.",
    "word " * 60,
    "日本の首都は東京です。",
    "\x00 [1] [99] see [2, 3].",
]


@st.composite
def documents(draw: st.DrawFn, limits: pb.ServerLimits, most: int, loose: bool) -> list[pb.Document]:
    """Documents with unique ids; in a loose case also repeated, empty and over-long ids, blank texts, texts at and
    past the character limit, and one document more than allowed."""
    size = limits.max_rag_document_chars
    texts = st.sampled_from(DOCUMENT_TEXTS) | TEXTS | near(size, "Lorem ipsum. ", over=loose)
    ids = st.sampled_from(["d1", "d2", "d3", "日本", "\x00", "x" * 256] + (["", "x" * 257] if loose else []))
    metadata = st.dictionaries(st.sampled_from(["k", "", "\x00", "日本"]), TEXTS, max_size=2)
    one = st.builds(pb.Document, id=ids, text=texts | BLANK_TEXTS if loose else texts, title=TEXTS, metadata=metadata)
    count = draw(st.integers(0, 3) | st.sampled_from([most, most + 1] if loose else [most]))
    items = draw(st.lists(one, min_size=count, max_size=count))
    if not loose:  # unique ids, and the count within the limit
        items = list({d.id: d for d in items}.values())[:most]
    return items


@st.composite
def rag_requests(draw: st.DrawFn, served: Served) -> tuple[pb.RagQueryRequest, Constraint | None]:
    loose, limits = draw(LOOSE), served.limits
    request = pb.RagQueryRequest(
        query=draw(TEXTS | near(limits.max_rag_query_chars, "why ", over=loose) | (BLANK_TEXTS if loose else TEXTS)),
        documents=draw(documents(limits, limits.max_rag_documents, loose)),
        adapter_id=draw(st.sampled_from(ADAPTER_IDS[0] + (ADAPTER_IDS[1] if loose else []))),
        collection=draw(st.just("") | st.sampled_from(COLLECTIONS[0] + (COLLECTIONS[1] if loose else []))),
    )
    if not loose and not request.documents and not request.collection:
        request.collection = "docs"
    top = limits.max_rag_top_k
    set_fields(
        request,
        {
            "top_k": draw(values([1, 3, top], [0, top + 1, UINT32_MAX], loose)),
            "min_similarity": draw(values(SIMILARITIES[0], SIMILARITIES[1], loose)),
        },
    )
    copy_in(request, "sampling", draw(sampling(served, loose)))
    copy_in(request, "stopping", draw(stopping(limits, loose)))
    constraint = draw(constraints(limits, loose))
    if constraint is not None:
        request.constraint.CopyFrom(constraint.message())
    return request, constraint


# ---- Tokenize --------------------------------------------------------------------------------------------------------


@st.composite
def tokenize_requests(draw: st.DrawFn, served: Served) -> pb.TokenizeRequest:
    loose = draw(LOOSE)
    given_input = draw(inputs(served, loose))
    request = pb.TokenizeRequest(text=given_input.get("prompt", ""), messages=given_input.get("messages", []))
    return set_fields(request, {"return_tokens": draw(values(st.booleans(), [], loose))})


# ---- AdapterService --------------------------------------------------------------------------------------------------

RUNTIME_IDS = (
    ["r1", "r2", "r3", "alpha", "beta", "a" * 64],
    ["", "../x", "a" * 65, "-x", "x y", "\x00", "日本", "x/y"],
)


def adapter_sources(root: Path, loose: bool) -> st.SearchStrategy[str]:
    folders = sorted(p.name for p in root.iterdir())
    edge = [
        "../alpha",
        str(root / "alpha"),
        str(root),
        "/etc",
        "/",
        ".",
        "",
        "alpha/",
        "alpha/../beta",
        "a" * 5000,
        "a\x00b",
        "s3://bucket/x",
        "s3://",
        "s3://../x",
        "日本",
        " alpha",
        "../" * 50,
    ]
    return st.sampled_from(folders + (edge if loose else [str(root / "beta")]))


@st.composite
def adapter_calls(draw: st.DrawFn, served: Served) -> tuple[str, Any]:
    """LoadAdapter (with versions too), UnloadAdapter or ListAdapters, on a small set of ids."""
    loose = draw(LOOSE)
    adapter_id = draw(st.sampled_from(RUNTIME_IDS[0] + (RUNTIME_IDS[1] if loose else [])))
    rpc = draw(st.sampled_from(["LoadAdapter", "LoadAdapter", "UnloadAdapter", "ListAdapters"]))
    if rpc == "UnloadAdapter":
        return rpc, pb.UnloadAdapterRequest(adapter_id=adapter_id)
    if rpc == "ListAdapters":
        return rpc, pb.ListAdaptersRequest()
    request = pb.LoadAdapterRequest(adapter_id=adapter_id, source=draw(adapter_sources(served.root, loose)))
    return rpc, set_fields(request, {"version": draw(values(["v1"], ["", "\x00", "x" * 5000], loose))})


# ---- CollectionService -----------------------------------------------------------------------------------------------


@st.composite
def collection_calls(draw: st.DrawFn, served: Served) -> tuple[str, Any]:
    """Upserts, deletes and listings on a few collection names."""
    loose, limits = draw(LOOSE), served.limits
    name = draw(st.sampled_from(COLLECTIONS[0] + (COLLECTIONS[1] if loose else [])))
    rpc = draw(st.sampled_from(["UpsertDocuments", "UpsertDocuments", "DeleteDocuments", "ListCollections"]))
    if draw(st.integers(0, 9)) == 0:
        rpc = "DeleteCollection"
    if rpc == "UpsertDocuments":
        docs = draw(documents(limits, limits.max_upsert_documents, loose))
        return rpc, pb.UpsertDocumentsRequest(collection=name, documents=docs)
    if rpc == "DeleteDocuments":
        ids = draw(st.lists(st.sampled_from(["d1", "d2", "d3", "nope", "", "\x00", "x" * 300]), max_size=4))
        return rpc, pb.DeleteDocumentsRequest(collection=name, document_ids=ids)
    if rpc == "DeleteCollection":
        return rpc, pb.DeleteCollectionRequest(name=name)
    return rpc, pb.ListCollectionsRequest()


# ---- the OpenAI-compatible HTTP API ----------------------------------------------------------------------------------

RESPONSE_FORMATS = [
    {"type": "text"},
    {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
    {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "array", "items": {"type": "integer"}}}},
    {"type": "json_schema", "json_schema": {"schema": {"type": "integer", "minimum": 5, "maximum": 1}}},
    {"type": "json_schema", "json_schema": {"schema": {"enum": []}, "strict": True}},
    {"type": "json_schema", "json_schema": {"schema": {"$ref": "#"}}},
]
MALFORMED_FORMATS = [{"type": "json_schema"}, {"type": "xml"}, {"type": "json_schema", "json_schema": {"name": "x"}}]


@st.composite
def http_bodies(draw: st.DrawFn, served: Served, chat: bool) -> dict[str, Any]:
    """A /v1/chat/completions or /v1/completions body, with OpenAI's field names and ranges."""
    loose, limits = draw(LOOSE), served.limits
    top, stop_length = limits.max_new_tokens, limits.max_stop_sequence_length
    usual_models = [served.model_name, served.model_name, "alpha", "beta"]
    body: dict[str, Any] = {"model": draw(st.sampled_from(usual_models + (["unknown", "", "r1"] if loose else [])))}
    if chat:
        roles = ["system", "user", "assistant", "developer"] + (["tool", "", "function"] if loose else [])
        content = TEXTS | st.lists(st.builds(lambda t: {"type": "text", "text": t}, TEXTS), min_size=1, max_size=2)
        message = st.fixed_dictionaries(
            {"role": st.sampled_from(roles), "content": content | st.none() if loose else content}
        )
        body["messages"] = draw(st.lists(message, min_size=0 if loose else 1, max_size=4))
    else:
        body["prompt"] = draw(TEXTS | st.lists(TEXTS, min_size=1, max_size=3) | (BLANK_TEXTS if loose else TEXTS))
    sizes = st.integers(1, 8) | st.just(top)
    token_limit = "max_completion_tokens" if chat and draw(st.booleans()) else "max_tokens"
    optional = {
        token_limit: values(sizes, [0, -1, top + 1, 2**63, 2**64, 10**30], loose),
        "temperature": values(
            [0, 1e-4, 0.7, 1.0, 2.0], [1e-40, 5e-324, 1e-310, 2.0000001, -0.0, 1e-5, math.nan, math.inf], loose
        ),
        "top_p": values([1e-40, 5e-324, 0.5, 1.0], [0.0, 1.0000001, -1.0, math.nan], loose),
        "n": values(st.integers(1, 3), [4, 8, 0, 9], loose),
        "stop": values(
            st.sampled_from(["\n", "the"])
            | st.lists(st.sampled_from([" ", ".", "日本", "x" * stop_length]), max_size=4),
            [[""], ["a"] * 5, "x" * (stop_length + 1)],
            loose,
        ),
        "seed": values([0, 2**63 - 1, UINT64_MAX], [2**64, -1], loose),
        "response_format": values(RESPONSE_FORMATS, MALFORMED_FORMATS, loose),
        "top_k": values([0, 1, 40], [-1], loose),
        "repetition_penalty": values([0.5, 1.0, 1.3], [0.0, 1e-40, 101.0], loose),
        "min_tokens": values([0, 1, 2], [top + 1, -1], loose),
        "presence_penalty": values([0.0], [0.5], loose),
        "user": values(TEXTS, [], loose),
    }
    if chat:
        optional["logprobs"] = values(st.booleans(), [], loose)
        optional["top_logprobs"] = values([0, 1, limits.max_top_n], [limits.max_top_n + 1, 20, 21, -1], loose)
    else:
        optional["logprobs"] = values(st.integers(0, 5), [6, -1], loose)
    body |= {k: v for k, v in ((k, draw(s)) for k, s in optional.items()) if v is not None}
    if chat and body.get("top_logprobs") and not loose:
        body["logprobs"] = True
    if draw(st.booleans()):
        body["stream"] = True
        if draw(st.booleans()):
            body["stream_options"] = {"include_usage": draw(st.booleans())}
    return body
