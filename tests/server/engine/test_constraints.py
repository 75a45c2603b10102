"""Structured output in the engine: constraints compile (or are refused with the library's message), masks allow
exactly what keeps the text a valid prefix, and constrained rows share batches with free and adapter rows without
changing them. On the tiny random Llama, whose choices only the masks make sensible."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
import torch

from loraserve.errors import InvalidRequest
from loraserve.server.engine.constraints import ConstraintCompiler, apply_masks
from loraserve.server.engine.outputs import StopReason
from loraserve.server.engine.params import (
    ConstraintKind,
    GenerationRequest,
    OutputConstraint,
    OutputOptions,
    SamplingParams,
    StoppingParams,
)
from loraserve.server.engine.sampling import RowSampler, RowStep, sample_next
from tests.conftest import HANG_GUARD_S

EOS = 2


def schema(value: object) -> OutputConstraint:
    return OutputConstraint(ConstraintKind.JSON_SCHEMA, json.dumps(value))


def regex(pattern: str) -> OutputConstraint:
    return OutputConstraint(ConstraintKind.REGEX, pattern)


def choice(*values: str) -> OutputConstraint:
    return OutputConstraint(ConstraintKind.CHOICE, choices=values)


@pytest.fixture(scope="module")
def compiler(tokenizer) -> ConstraintCompiler:
    return ConstraintCompiler(tokenizer, len(tokenizer), frozenset({EOS}), cache_size=4)


@pytest.mark.parametrize(
    ("constraint", "field", "fragment"),
    [
        (OutputConstraint(ConstraintKind.JSON_SCHEMA, '{"type": '), "constraint.json_schema", "is not JSON"),
        (OutputConstraint(ConstraintKind.JSON_SCHEMA, "[1, 2]"), "constraint.json_schema", "must be a JSON object"),
        (schema({"type": "strnig"}), "constraint.json_schema", "strnig"),
        (schema({"type": "string", "not": {"const": "a"}}), "constraint.json_schema", "not"),
        (schema({"type": "array", "uniqueItems": True}), "constraint.json_schema", "uniqueItems"),
        (schema({"type": "string", "pattern": "(["}), "constraint.json_schema", "unclosed"),
        (regex("(ab"), "constraint.regex", "unclosed group"),
        (regex("a{3,1}"), "constraint.regex", "repetition"),
        (OutputConstraint(ConstraintKind.GRAMMAR, "start: item\n"), "constraint.grammar", "item"),
        (OutputConstraint(ConstraintKind.GRAMMAR, 'start: "a" (('), "constraint.grammar", ""),
    ],
)
def test_a_constraint_that_does_not_compile_is_refused_with_the_library_message(
    compiler, constraint, field, fragment
) -> None:
    with pytest.raises(InvalidRequest) as raised:
        compiler.compile(constraint)
    assert raised.value.field == field
    assert fragment in str(raised.value)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: choice(), "constraint.choice.values"),
        (lambda: choice("yes", ""), "constraint.choice.values[1]"),
        (lambda: regex(""), "constraint.regex"),
        (lambda: OutputConstraint(ConstraintKind.JSON_SCHEMA, "  "), "constraint.json_schema"),
        (lambda: OutputConstraint(ConstraintKind.GRAMMAR, ""), "constraint.grammar"),
    ],
)
def test_an_empty_constraint_is_refused_before_compiling(make, field) -> None:
    with pytest.raises(InvalidRequest) as raised:
        make()
    assert raised.value.field == field


def test_compiled_constraints_are_cached_by_content_and_each_request_gets_its_own_state(compiler, tokenizer) -> None:
    first = compiler.compile(choice("yes", "no"))
    cached = compiler.cached
    second = compiler.compile(choice("yes", "no"))
    assert compiler.cached == cached  # the same content compiled once
    for token in tokenizer.encode("yes", add_special_tokens=False):
        first.advance(token)
    assert first.complete and not second.complete  # advancing one request does not move another
    compiler.compile(choice("no", "yes"))  # other content: compiled and cached on its own
    assert compiler.cached == cached + 1


def test_the_cache_keeps_only_the_most_recent_constraints(tokenizer) -> None:
    small = ConstraintCompiler(tokenizer, len(tokenizer), frozenset({EOS}), cache_size=2)
    for pattern in ("a+", "b+", "c+"):
        small.compile(regex(pattern))
    assert small.cached == 2


def allowed_ids(scores: torch.Tensor, row: int) -> list[int]:
    return torch.nonzero(torch.isfinite(scores[row])).flatten().tolist()


def test_masks_allow_exactly_the_tokens_that_keep_the_text_valid_and_leave_other_rows_alone(
    compiler, tokenizer
) -> None:
    choices = ("yes", "no", "maybe later")
    rows = [(1, compiler.compile(choice(*choices))), (3, compiler.compile(regex(r"[0-9]{2}")))]
    scores = torch.randn(4, len(tokenizer))
    original = scores.clone()
    apply_masks(scores, rows)
    assert torch.equal(scores[0], original[0]) and torch.equal(scores[2], original[2])
    texts = [tokenizer.decode([t]) for t in allowed_ids(scores, 1)]
    assert texts and all(any(c.startswith(text) for c in choices) for text in texts)
    # every token that starts a choice is allowed, not only some
    starts = [t for t in range(len(tokenizer)) if any(c.startswith(tokenizer.decode([t])) for c in choices)]
    assert set(allowed_ids(scores, 1)) == {t for t in starts if tokenizer.decode([t])}
    digits = [tokenizer.decode([t]) for t in allowed_ids(scores, 3)]
    assert digits and all(re.fullmatch(r"[0-9]{1,2}", d) for d in digits)
    # allowed scores are unchanged
    allowed = allowed_ids(scores, 3)
    assert torch.equal(scores[3, allowed], original[3, allowed])


def test_only_an_end_of_sequence_token_is_allowed_once_the_text_may_end_but_could_go_on(compiler, tokenizer) -> None:
    row = compiler.compile(regex(r"[0-9]+"))
    for token in tokenizer.encode("12", add_special_tokens=False):
        row.advance(token)
    assert not row.complete
    scores = torch.zeros(1, len(tokenizer))
    apply_masks(scores, [(0, row)])
    allowed = allowed_ids(scores, 0)
    assert EOS in allowed and all(t == EOS or tokenizer.decode([t]).isdigit() for t in allowed)
    row.advance(EOS)
    assert row.complete


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.5])
def test_sampling_under_a_mask_picks_only_allowed_tokens(compiler, temperature: float) -> None:
    params = SamplingParams(temperature=temperature, top_k=50, top_p=0.9, seed=7)
    for _ in range(5):
        row = compiler.compile(choice("red", "green", "blue"))
        step = RowStep(sampler=RowSampler.create(params, torch.device("cpu")), constraint=row)
        scores = torch.randn(2, compiler.vocab_size)
        masked = scores.clone()
        apply_masks(masked, [(0, row)])
        sampled = sample_next(scores, [step, RowStep(sampler=RowSampler.create(params, torch.device("cpu")))])
        assert sampled.token_ids[0] in allowed_ids(masked, 0)
        assert sampled.mask_seconds > 0


def test_a_suppressed_eos_that_is_all_the_constraint_allows_is_still_picked(compiler, tokenizer) -> None:
    """min_new_tokens suppresses EOS; when the constraint allows nothing else, the constraint wins."""
    row = compiler.compile(regex("ab"))
    for token in tokenizer.encode("ab", add_special_tokens=False):
        row.advance(token)
    step = RowStep(
        sampler=RowSampler.create(SamplingParams(), torch.device("cpu")), suppressed_ids=(EOS,), constraint=row
    )
    assert sample_next(torch.randn(1, len(tokenizer)), [step]).token_ids == [EOS]


# ---- the engine ----------------------------------------------------------------------------------------------------

PROMPT = "Answer the question:"


def validates(text: str, value: dict) -> bool:
    jsonschema.validate(json.loads(text), value)  # raises when it does not
    return True


def constrained(constraint: OutputConstraint, n: int = 24, **kwargs: object) -> GenerationRequest:
    return GenerationRequest(prompt=PROMPT, constraint=constraint, stopping=StoppingParams(max_new_tokens=n), **kwargs)


def test_constrained_free_and_adapter_rows_share_a_batch(make_engine, reference) -> None:
    engine = make_engine()
    bounded = {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "integer", "minimum": 1, "maximum": 9},
            "ok": {"type": "boolean"},
        },
        "required": ["color", "size", "ok"],
        "additionalProperties": False,
    }
    cases = {
        "json": (constrained(schema(bounded)), lambda text: validates(text, bounded)),
        "regex": (constrained(regex(r"[a-z]{3}-\d{2}")), lambda text: re.fullmatch(r"[a-z]{3}-\d{2}", text, re.A)),
        "choice": (constrained(choice("alpha", "beta", "gamma")), lambda text: text in ("alpha", "beta", "gamma")),
        "adapter-choice": (
            constrained(choice("left", "right"), adapter_id="alpha"),
            lambda text: text in ("left", "right"),
        ),
    }
    free = [
        GenerationRequest(
            prompt=PROMPT,
            adapter_id=adapter,
            stopping=StoppingParams(max_new_tokens=10, min_new_tokens=10),
            output=OutputOptions(token_ids=True),
        )
        for adapter in ("", "beta")
    ]
    streams = {name: engine.submit(request) for name, (request, _) in cases.items()}
    free_streams = [engine.submit(r) for r in free]
    for name, (_, valid) in cases.items():
        result = streams[name].result()
        assert result.stop_reason is StopReason.CONSTRAINT_COMPLETE, name
        assert valid(result.text), (name, result.text)
    prompt_ids = engine.tokenization.encode(PROMPT)
    for request, stream in zip(free, free_streams, strict=True):
        assert [t.id for t in stream.result().tokens] == reference(prompt_ids, 10, request.adapter_id)
    stats = engine.stats()
    assert stats.constrained_requests == len(cases)
    assert stats.constraint_mask_steps > 0 and stats.constraint_mask_seconds > 0


def test_a_constrained_row_cut_off_by_max_new_tokens_says_so_and_is_a_valid_prefix(make_engine) -> None:
    engine = make_engine()
    result = engine.submit(constrained(regex(r"(ab){40}"), n=5)).result()
    assert result.stop_reason is StopReason.MAX_TOKENS
    assert result.generated_token_count == 5
    assert result.text and re.fullmatch(r"(ab)*a?", result.text)


def test_sampled_constrained_rows_are_valid_and_repeatable_with_a_seed(make_engine) -> None:
    engine = make_engine()
    sampling = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    words = ("one", "two", "three", "four", "five")
    texts = []
    for _ in range(2):
        result = engine.submit(constrained(choice(*words), sampling=sampling)).result()
        assert result.stop_reason is StopReason.CONSTRAINT_COMPLETE and result.text in words
        texts.append(result.text)
    assert texts[0] == texts[1]


def test_min_new_tokens_holds_off_the_end_while_the_constraint_can_go_on(make_engine) -> None:
    engine = make_engine()
    stopping = StoppingParams(max_new_tokens=30, min_new_tokens=6)
    result = engine.submit(
        GenerationRequest(prompt=PROMPT, constraint=regex("[0-9]{1,40}"), stopping=stopping)
    ).result()
    assert result.generated_token_count >= 6
    assert re.fullmatch("[0-9]+", result.text)


def test_a_stop_sequence_ends_a_constrained_row(make_engine) -> None:
    """The constraint forces "xyzyz..."; the stop sequence "zy" cuts it after "xy"."""
    engine = make_engine()
    stopping = StoppingParams(max_new_tokens=30, stop_sequences=("zy",))
    result = engine.submit(
        GenerationRequest(prompt=PROMPT, constraint=regex("x(yz){3,10}"), stopping=stopping)
    ).result()
    assert result.stop_reason is StopReason.STOP_SEQUENCE
    assert result.text == "xy"


def test_a_bad_constraint_is_refused_at_submit_and_the_engine_keeps_serving(make_engine) -> None:
    engine = make_engine()
    with pytest.raises(InvalidRequest, match=r"constraint\.regex"):
        engine.submit(constrained(regex("(unclosed")))
    result = engine.submit(constrained(choice("fine"))).result()
    assert result.text == "fine" and result.stop_reason is StopReason.CONSTRAINT_COMPLETE


def test_constraint_size_and_choice_count_are_limited(make_engine) -> None:
    engine = make_engine(max_constraint_bytes=64, max_constraint_choices=3)
    with pytest.raises(InvalidRequest, match="at most 64"):
        engine.submit(constrained(regex("a" * 65)))
    with pytest.raises(InvalidRequest, match="at most 3"):
        engine.submit(constrained(choice("a", "b", "c", "d")))


def test_a_slow_compile_never_stalls_the_batch(make_engine, monkeypatch) -> None:
    """The compile waits until a free request has finished: were it on the engine thread, that could never happen."""
    engine = make_engine()
    original = engine.constraints._compile
    free_finished = threading.Event()
    waited: list[bool] = []

    def slow_compile(constraint: OutputConstraint):  # type: ignore[no-untyped-def]
        waited.append(free_finished.wait(HANG_GUARD_S))
        return original(constraint)

    monkeypatch.setattr(engine.constraints, "_compile", slow_compile)
    free = engine.submit(
        GenerationRequest(prompt=PROMPT, stopping=StoppingParams(max_new_tokens=20, min_new_tokens=20))
    )
    results = []
    submitter = threading.Thread(target=lambda: results.append(engine.submit(constrained(choice("x", "y"))).result()))
    submitter.start()
    assert free.result().generated_token_count == 20
    free_finished.set()
    submitter.join(HANG_GUARD_S)
    assert not submitter.is_alive(), f"hang guard: no result after {HANG_GUARD_S:.0f} s"
    assert waited == [True]
    assert results[0].text in ("x", "y")
