"""Structured output: a request's OutputConstraint compiled into a token-level matcher, and the per-row token masks
the batched sampler applies.

The library is llguidance (Rust, no dependencies). bench/structured.py measured it beside xgrammar and outlines-core
with the default model's tokenizer; why it was chosen is in docs/structured-output.md ("Why llguidance"): it implements
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
from dataclasses import dataclass

import llguidance
import llguidance.hf
import numpy as np
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


@dataclass(frozen=True)
class SpecialTokens:
    """The tokenizer's special tokens (their text is never output text), as bitmask words that clear them.

    llguidance's masks can allow a special token whose text spells the forced next bytes (a regex or literal
    `<|im_end|>` lets token <|im_end|> through), and then refuse it when it is consumed (guidance-ai/llguidance#366,
    dottxt-ai/outlines#1771). So a constrained row never gets a special token, except an end-of-sequence token once
    its text is complete. The masks are precomputed: one AND per row and step, whatever the number of special tokens
    (Mistral's tokenizer has 771)."""

    names: dict[int, str]
    bits: torch.Tensor  # [W] int32: the special tokens' bits
    keep_text: torch.Tensor  # [W] int32: every bit but the special tokens'
    keep_text_and_eos: torch.Tensor  # [W] int32: every bit but the special tokens' that do not end the text

    @classmethod
    def of(cls, names: dict[int, str], eos_ids: frozenset[int], vocab_size: int) -> SpecialTokens:
        words = (vocab_size + 31) // 32

        def bitmask(ids: set[int]) -> np.ndarray:
            mask = np.zeros(words, dtype=np.uint32)
            for token in ids:
                mask[token // 32] |= np.uint32(1 << (token % 32))
            return mask

        special, ending = bitmask(set(names)), bitmask(set(names) & set(eos_ids))

        def as_int32(mask: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(mask.view(np.int32).copy())

        return cls(names, as_int32(special), as_int32(~special), as_int32(~(special & ~ending)))


class RowConstraint:
    """One request's position in its constraint. Only the engine thread uses it once the request is queued."""

    def __init__(self, matcher: llguidance.LLMatcher, special: SpecialTokens) -> None:
        self._matcher = matcher
        self._special = special
        self._special_allowed: torch.Tensor | None = None  # the special tokens the last mask offered, as bits

    def fill_mask(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens as bits (bit t of word t // 32 set = token t allowed) into `row`, a
        contiguous int32 CPU tensor of ceil(vocab / 32) words; special tokens that are not text are left out."""
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
        special = self._special
        self._special_allowed = row & special.bits
        row.bitwise_and_(special.keep_text_and_eos if self._matcher.is_accepting() else special.keep_text)

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

    def dead_end(self) -> str:
        """Why no token can continue the text, for a row whose mask came out empty."""
        allowed = self._special_allowed
        blocked = []
        if allowed is not None:
            for word in torch.nonzero(allowed).flatten().tolist():
                bits = int(allowed[word]) & 0xFFFFFFFF
                blocked += [self._special.names[word * 32 + b] for b in range(32) if bits >> b & 1]
        if blocked:
            return (
                f"the text it needs next spells the special token {', '.join(blocked)}, which this model's "
                "tokenizer keeps as a control token, never as text; leave it out of the constraint"
            )
        return "no text can continue it"


class ConstraintCompiler:
    """Compiles constraints for one model's tokenizer and keeps the last `cache_size` of them. Thread-safe."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: frozenset[int], cache_size: int
    ) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos_token_ids = sorted(eos_token_ids)
        self._special = special_tokens(tokenizer, vocab_size, eos_token_ids)
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
        return RowConstraint(template.deep_copy(), self._special)

    def _compile(self, constraint: OutputConstraint) -> llguidance.LLMatcher:
        grammar = grammar_for(constraint)
        # Builds the lexer and parser with the GIL released: other threads (the engine's) run meanwhile.
        matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0, limits=self._limits)
        if matcher.is_error():
            raise InvalidRequest(f"does not compile: {_short(matcher.get_error())}", constraint.field)
        self._check_first_step(matcher, constraint)
        return matcher

    def _check_first_step(self, matcher: llguidance.LLMatcher, constraint: OutputConstraint) -> None:
        """Refuse here, not after queueing, a constraint no token can start: one whose language is empty
        (`start: start`, `[^\\s\\S]`), or whose first text is a special token's."""
        probe = RowConstraint(matcher.deep_copy(), self._special)
        row = torch.zeros((self.vocab_size + 31) // 32, dtype=torch.int32)
        probe.fill_mask(row)
        if probe.error is not None:  # the library's way of saying the same, for some empty languages
            library = probe.error.splitlines()[0]
            raise InvalidRequest(f"cannot be satisfied: no text can start it ({library})", constraint.field)
        if not bool(row.any()):
            raise InvalidRequest(f"cannot be satisfied: {probe.dead_end()}", constraint.field)

    @property
    def cached(self) -> int:
        with self._lock:
            return len(self._compiled)


def special_tokens(tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: frozenset[int]) -> SpecialTokens:
    added = getattr(tokenizer, "added_tokens_decoder", {})
    ids = set(tokenizer.all_special_ids) | {i for i, token in added.items() if getattr(token, "special", False)}
    names = {i: str(added[i]) if i in added else tokenizer.convert_ids_to_tokens(i) for i in ids if 0 <= i < vocab_size}
    return SpecialTokens.of(names, eos_token_ids, vocab_size)


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
