"""What the engine produces for a request: a stream of chunks, one per generated token, and their sum."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, replace


class StopReason(enum.Enum):
    """Why generation ended (mirrors the contract's StopReason)."""

    MAX_TOKENS = "max_tokens"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    TIME_LIMIT = "time_limit"
    CANCELLED = "cancelled"
    TOKEN_LIMIT = "token_limit"
    CONSTRAINT_COMPLETE = "constraint_complete"


@dataclass(frozen=True)
class TopToken:
    """An alternative the model considered at one step."""

    id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TokenDetail:
    """One prompt or output token, with its log-probability and alternatives when they were asked for."""

    id: int
    text: str
    logprob: float | None = None
    top_tokens: tuple[TopToken, ...] = ()


@dataclass(frozen=True)
class GenerationChunk:
    """The output of one engine step for one request. The last chunk has stop_reason set."""

    request_id: str
    text: str
    input_token_count: int
    generated_token_count: int
    tokens: tuple[TokenDetail, ...] = ()
    seed: int | None = None
    stop_reason: StopReason | None = None
    stop_sequence: str = ""
    input_tokens: tuple[TokenDetail, ...] = ()
    cached_input_token_count: int = 0  # prompt tokens served from the prefix cache

    @property
    def finished(self) -> bool:
        return self.stop_reason is not None

    def followed_by(self, later: GenerationChunk) -> GenerationChunk:
        """This chunk and the next as one: their text and tokens joined, the counts and stop of the later one."""
        return replace(
            later,
            text=self.text + later.text,
            tokens=self.tokens + later.tokens,
            input_tokens=self.input_tokens or later.input_tokens,
        )


@dataclass(frozen=True)
class GenerationResult:
    """A whole completion: the chunks of a request added up."""

    request_id: str
    text: str
    stop_reason: StopReason
    input_token_count: int
    generated_token_count: int
    tokens: tuple[TokenDetail, ...] = ()
    seed: int | None = None
    stop_sequence: str = ""
    input_tokens: tuple[TokenDetail, ...] = ()
    cached_input_token_count: int = 0  # prompt tokens served from the prefix cache

    @classmethod
    def from_chunks(cls, chunks: Iterable[GenerationChunk]) -> GenerationResult:
        texts: list[str] = []
        tokens: list[TokenDetail] = []
        input_tokens: tuple[TokenDetail, ...] = ()
        last: GenerationChunk | None = None
        for chunk in chunks:
            texts.append(chunk.text)
            tokens.extend(chunk.tokens)
            input_tokens = input_tokens or chunk.input_tokens
            last = chunk
        if last is None or last.stop_reason is None:
            raise ValueError("the chunks end before the request finished")
        return cls(
            request_id=last.request_id,
            text="".join(texts),
            stop_reason=last.stop_reason,
            input_token_count=last.input_token_count,
            generated_token_count=last.generated_token_count,
            cached_input_token_count=last.cached_input_token_count,
            tokens=tuple(tokens),
            seed=last.seed,
            stop_sequence=last.stop_sequence,
            input_tokens=input_tokens,
        )
