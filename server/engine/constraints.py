"""Structured output: a request's OutputConstraint compiled into a token-level matcher, and the per-row token masks
the batched sampler applies.

The library is llguidance (Rust, no dependencies). bench/structured.py measured it beside xgrammar and outlines-core
with the default model's tokenizer; the reasons it was chosen are in the README ("Structured output"): it implements
JSON schema, regex and Lark grammars with one engine, it refuses a JSON-schema keyword it does not implement instead
of ignoring it (xgrammar accepted `if`/`then` and would have generated text the schema rejects), it needs no
up-front compilation over the vocabulary (outlines-core builds an index of every regex state x token first, and has
no grammars), and its masks cost tens of microseconds per row.

Compiling happens on the caller's thread (an RPC thread), never on the engine thread, and the result is cached by the
constraint's content: a request gets a copy of the cached matcher. The engine thread only computes masks and feeds
sampled tokens, which take microseconds.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence

import llguidance
import llguidance.hf
import torch
from transformers import PreTrainedTokenizerBase

from loraserve.errors import FailedPrecondition, InvalidRequest
from loraserve.server.engine.params import ConstraintKind, OutputConstraint

# JSON comes out compact ({"a":1,"b":[2,3]}): with free whitespace a small model can emit spaces or newlines until
# max_new_tokens. A schema can still ask for it with "x-guidance": {"whitespace_flexible": true}.
JSON_OPTIONS: llguidance.JsonCompileOptions = {"whitespace_flexible": False}
_MAX_ERROR_CHARS = 1000


def grammar_for(constraint: OutputConstraint) -> str:
    """The constraint as an llguidance grammar. Raises InvalidRequest for what is wrong before compiling: a schema
    that is not JSON or not an object."""
    kind = constraint.kind
    if kind is ConstraintKind.JSON_SCHEMA:
        try:
            schema = json.loads(constraint.text)
        except json.JSONDecodeError as error:
            raise InvalidRequest(f"is not JSON: {error}", constraint.field) from None
        if not isinstance(schema, dict):
            raise InvalidRequest(f"must be a JSON object (a schema), got {type(schema).__name__}", constraint.field)
        return _from_json_schema(schema, constraint.field)
    if kind is ConstraintKind.JSON_OBJECT:
        return _from_json_schema({"type": "object"}, constraint.field)
    if kind is ConstraintKind.REGEX:
        # \d, \w and \s as ASCII classes (Python's re.ASCII): Rust's Unicode \d let the model write digits from
        # other scripts, which no caller expecting a phone number wants.
        return "start: /" + llguidance.regex_to_lark(constraint.text, "dws") + "/"
    if kind is ConstraintKind.CHOICE:
        # Lark string literals take JSON's escapes, so json.dumps quotes any string exactly.
        return "start: " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in constraint.choices)
    return llguidance.LLMatcher.grammar_from_lark(constraint.text)


def _from_json_schema(schema: dict, field: str) -> str:
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as error:
        raise InvalidRequest(f"is not a usable JSON schema: {error}", field) from None


class RowConstraint:
    """One request's position in its constraint. Only the engine thread uses it once the request is queued."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def fill_mask(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens as bits (bit t of word t // 32 set = token t allowed) into `row`, a
        contiguous int32 CPU tensor of ceil(vocab / 32) words."""
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def advance(self, token_id: int) -> None:
        """Take the sampled token; a token the mask did not allow puts the matcher in its error state."""
        self._matcher.consume_token(token_id)

    @property
    def complete(self) -> bool:
        """The text is in the language and nothing more may follow (or an end-of-sequence token ended it)."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    @property
    def error(self) -> str | None:
        """Why the matcher cannot go on (a grammar too complex to follow at this point, say), or None."""
        return _short(self._matcher.get_error()) if self._matcher.is_error() else None


class ConstraintCompiler:
    """Compiles constraints for one model's tokenizer and keeps the last `cache_size` of them. Thread-safe."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: frozenset[int], cache_size: int
    ) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos_token_ids = sorted(eos_token_ids)
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[bytes, llguidance.LLMatcher] = OrderedDict()
        # verbose errors would put the parser state and the whole grammar in every message
        self._limits = llguidance.LLParserLimits(verbose_errors=False)

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        """The vocabulary as llguidance sees it, built on first use (about half a second for 49k tokens)."""
        with self._lock:
            if self._ll_tokenizer is None:
                try:
                    self._ll_tokenizer = llguidance.hf.from_tokenizer(
                        self._tokenizer, n_vocab=self.vocab_size, eos_token=self._eos_token_ids
                    )
                except ValueError as error:
                    raise FailedPrecondition(
                        f"structured output needs a fast (Rust) Hugging Face tokenizer, and this model's is not one: "
                        f"{error}"
                    ) from None
            return self._ll_tokenizer

    def compile(self, constraint: OutputConstraint) -> RowConstraint:
        """A fresh matcher for one request. Raises InvalidRequest, with the library's message, for a constraint
        that does not compile."""
        key = constraint.key
        with self._lock:
            template = self._compiled.get(key)
            if template is not None:
                self._compiled.move_to_end(key)
        if template is None:
            template = self._compile(constraint)
            with self._lock:
                self._compiled[key] = template
                while len(self._compiled) > self._cache_size:
                    self._compiled.popitem(last=False)
        return RowConstraint(template.deep_copy())

    def _compile(self, constraint: OutputConstraint) -> llguidance.LLMatcher:
        grammar = grammar_for(constraint)
        # Builds the lexer and parser with the GIL released: other threads (the engine's) run meanwhile.
        matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0, limits=self._limits)
        if matcher.is_error():
            raise InvalidRequest(f"does not compile: {_short(matcher.get_error())}", constraint.field)
        return matcher

    @property
    def cached(self) -> int:
        with self._lock:
            return len(self._compiled)


def apply_masks(scores: torch.Tensor, rows: Sequence[tuple[int, RowConstraint]]) -> None:
    """Set to -inf, in place, the scores of tokens each constrained row may not take next. scores: [B, V] on any
    device; rows: (row index in scores, its constraint). A row whose matcher is in its error state is left alone:
    the engine ends that request with the error after this step."""
    vocab = scores.shape[-1]
    bitmask = torch.empty(len(rows), (vocab + 31) // 32, dtype=torch.int32)
    for j, (_, constraint) in enumerate(rows):
        constraint.fill_mask(bitmask[j])
        if constraint.error is not None:
            bitmask[j] = -1  # every bit set: nothing masked
    # Each byte of the bitmask (little-endian words: byte k holds tokens 8k..8k+7) looks up its 8 additive
    # penalties, 0 or -inf. Adding them is ~5x faster on a CPU than masked_fill with the unpacked booleans.
    byte_values = bitmask.view(torch.uint8).to(scores.device).view(-1).int()
    penalty = torch.index_select(_byte_penalties(scores.device, scores.dtype), 0, byte_values)
    index = torch.tensor([i for i, _ in rows], device=scores.device)
    scores.index_add_(0, index, penalty.view(len(rows), -1)[:, :vocab])


@functools.cache
def _byte_penalties(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 8]: for each byte value, 0 where its bit is set (token allowed) and -inf where it is not."""
    bits = (torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1
    return torch.zeros(256, 8, dtype=dtype).masked_fill(bits == 0, float("-inf")).to(device)


def _short(message: str) -> str:
    message = message.strip()
    return message if len(message) <= _MAX_ERROR_CHARS else message[:_MAX_ERROR_CHARS] + " ..."
