"""What a generation request asks for, as the engine sees it: plain frozen dataclasses that validate themselves.

Errors name the request field in the contract's terms ("sampling.top_p"), so the client knows what to fix.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import struct
from dataclasses import dataclass, field

from loraserve.errors import InvalidRequest
from loraserve.prompting import Message, validate_messages

MAX_SEED = 2**64 - 1


def _float32(value: float) -> float:
    return float(struct.unpack("f", struct.pack("f", value))[0])


# The ranges in which the sampler's float32 arithmetic is sound. Below MIN_TEMPERATURE, logits / temperature overflows
# to inf and the softmax gives NaN (vLLM refuses the same range); above MAX_TEMPERATURE sampling is already uniform,
# and float32 turns a temperature of 1e39 into inf (-inf / inf is NaN). A repetition penalty outside its range
# likewise overflows (a subnormal penalty divides a score into inf).
# The bounds as the contract's 32-bit floats hold them: a client that sends 1e-5 sends 9.99999975e-06.
MIN_TEMPERATURE = _float32(1e-5)
MAX_TEMPERATURE = 100.0
MIN_REPETITION_PENALTY = _float32(0.01)
MAX_REPETITION_PENALTY = 100.0


def _finite(value: float) -> bool:
    return math.isfinite(value)


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is picked. temperature 0 is greedy decoding."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature != 0 and not MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE:
            raise InvalidRequest(
                f"must be 0 (greedy) or in [1e-05, {MAX_TEMPERATURE:g}], got {self.temperature}",
                "sampling.temperature",
            )
        if self.top_k < 0:
            raise InvalidRequest(f"must be >= 0 (0 keeps every token), got {self.top_k}", "sampling.top_k")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequest(f"must be in (0, 1], got {self.top_p}", "sampling.top_p")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise InvalidRequest(
                f"must be in [0.01, {MAX_REPETITION_PENALTY:g}] (1 is none), got {self.repetition_penalty}",
                "sampling.repetition_penalty",
            )
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InvalidRequest(f"must be in [0, 2^64), got {self.seed}", "sampling.seed")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class StoppingParams:
    """When generation ends. max_new_tokens None means the server's default."""

    max_new_tokens: int | None = None
    min_new_tokens: int = 0
    stop_sequences: tuple[str, ...] = ()
    include_stop_sequence: bool = False
    time_limit_ms: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise InvalidRequest(f"must be >= 1, got {self.max_new_tokens}", "stopping.max_new_tokens")
        if self.min_new_tokens < 0:
            raise InvalidRequest(f"must be >= 0, got {self.min_new_tokens}", "stopping.min_new_tokens")
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise InvalidRequest(
                f"({self.min_new_tokens}) must not exceed max_new_tokens ({self.max_new_tokens})",
                "stopping.min_new_tokens",
            )
        for i, stop in enumerate(self.stop_sequences):
            if not stop:
                raise InvalidRequest("must not be empty", f"stopping.stop_sequences[{i}]")
        if self.time_limit_ms is not None and self.time_limit_ms < 1:
            raise InvalidRequest(f"must be >= 1 millisecond, got {self.time_limit_ms}", "stopping.time_limit_ms")


@dataclass(frozen=True)
class OutputOptions:
    """Optional per-token details in the output."""

    token_ids: bool = False
    logprobs: bool = False
    top_n: int = 0
    input_tokens: bool = False

    def __post_init__(self) -> None:
        if self.top_n < 0:
            raise InvalidRequest(f"must be >= 0, got {self.top_n}", "response.top_n")

    @property
    def token_details(self) -> bool:
        return self.token_ids or self.logprobs or self.top_n > 0


class ConstraintKind(enum.Enum):
    """What an OutputConstraint restricts the text to; the values are the contract's oneof field names."""

    JSON_SCHEMA = "json_schema"
    JSON_OBJECT = "json_object"
    REGEX = "regex"
    CHOICE = "choice"
    GRAMMAR = "grammar"


@dataclass(frozen=True)
class OutputConstraint:
    """The language the generated text must belong to: `text` holds the schema, regex or grammar; `choices` the
    allowed strings of a choice. Whether it compiles is the compiler's to say (loraserve.server.engine.constraints)."""

    kind: ConstraintKind
    text: str = ""
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind is ConstraintKind.CHOICE:
            if not self.choices:
                raise InvalidRequest("must list at least one allowed string", "constraint.choice.values")
            for i, choice in enumerate(self.choices):
                if not choice:
                    raise InvalidRequest("must not be empty", f"constraint.choice.values[{i}]")
        elif self.kind is not ConstraintKind.JSON_OBJECT and not self.text.strip():
            raise InvalidRequest("must not be empty (leave the constraint unset for free text)", self.field)

    @property
    def field(self) -> str:
        """The request field that holds it, for error messages."""
        return f"constraint.{self.kind.value}"

    @property
    def size_bytes(self) -> int:
        return len(self.text.encode()) + sum(len(c.encode()) for c in self.choices)

    @property
    def key(self) -> bytes:
        """Identifies the constraint by content: equal constraints compile once."""
        body = json.dumps([self.kind.value, self.text, self.choices], ensure_ascii=False)
        return hashlib.sha256(body.encode()).digest()


@dataclass(frozen=True)
class GenerationRequest:
    """One completion to generate: exactly one of a raw prompt and chat messages."""

    prompt: str = ""
    messages: tuple[Message, ...] = ()
    adapter_id: str = ""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StoppingParams = field(default_factory=StoppingParams)
    output: OutputOptions = field(default_factory=OutputOptions)
    truncate_input_tokens: int = 0
    constraint: OutputConstraint | None = None
    request_id: str = ""
    # time.monotonic() after which the caller no longer waits (its gRPC deadline); None for no deadline.
    deadline: float | None = None

    def __post_init__(self) -> None:
        if self.prompt and self.messages:
            raise InvalidRequest("give exactly one of prompt and messages, not both", "prompt")
        if not self.prompt and not self.messages:
            raise InvalidRequest("must not be empty (or give messages instead)", "prompt")
        if self.prompt and not self.prompt.strip():
            raise InvalidRequest("must contain more than whitespace", "prompt")
        if self.messages:
            validate_messages(self.messages)
        if self.truncate_input_tokens < 0:
            raise InvalidRequest(f"must be >= 0, got {self.truncate_input_tokens}", "truncate_input_tokens")
