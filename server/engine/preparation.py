"""Turning a validated request into what the engine runs: its prompt tokens and its token budget, checked against
the server's limits and the model's context. Runs on the caller's thread, before the request is queued."""

from __future__ import annotations

from dataclasses import dataclass

from loraserve.config import EngineConfig
from loraserve.errors import InvalidRequest
from loraserve.server.engine.params import GenerationRequest, OutputConstraint
from loraserve.server.engine.tokenization import Tokenization


class PromptTooLong(InvalidRequest):
    """The prompt leaves the context no room to generate."""


@dataclass(frozen=True)
class PreparedRequest:
    prompt_ids: list[int]
    max_new_tokens: int


def check_limits(request: GenerationRequest, config: EngineConfig) -> int:
    """Check the request against the server's limits; return its max_new_tokens."""
    stopping = request.stopping
    if stopping.max_new_tokens is not None and stopping.max_new_tokens > config.max_new_tokens:
        raise InvalidRequest(
            f"must be <= {config.max_new_tokens} (the server's limit), got {stopping.max_new_tokens}",
            "stopping.max_new_tokens",
        )
    max_new_tokens = stopping.max_new_tokens or config.default_max_new_tokens
    if stopping.min_new_tokens > max_new_tokens:
        raise InvalidRequest(
            f"({stopping.min_new_tokens}) must not exceed max_new_tokens ({max_new_tokens})", "stopping.min_new_tokens"
        )
    if len(stopping.stop_sequences) > config.max_stop_sequences:
        raise InvalidRequest(
            f"at most {config.max_stop_sequences} are allowed, got {len(stopping.stop_sequences)}",
            "stopping.stop_sequences",
        )
    for i, stop in enumerate(stopping.stop_sequences):
        if len(stop) > config.max_stop_sequence_length:
            raise InvalidRequest(
                f"is {len(stop)} characters; at most {config.max_stop_sequence_length} are allowed",
                f"stopping.stop_sequences[{i}]",
            )
    if request.output.top_n > config.max_top_n:
        raise InvalidRequest(f"must be <= {config.max_top_n}, got {request.output.top_n}", "response.top_n")
    if request.constraint is not None:
        check_constraint_limits(request.constraint, config)
    return max_new_tokens


def check_constraint_limits(constraint: OutputConstraint, config: EngineConfig) -> None:
    if constraint.size_bytes > config.max_constraint_bytes:
        raise InvalidRequest(
            f"is {constraint.size_bytes} bytes; at most {config.max_constraint_bytes} are allowed (the server's "
            "--max-constraint-bytes)",
            constraint.field,
        )
    if len(constraint.choices) > config.max_constraint_choices:
        raise InvalidRequest(
            f"lists {len(constraint.choices)} strings; at most {config.max_constraint_choices} are allowed",
            "constraint.choice.values",
        )


def prompt_ids(request: GenerationRequest, tokenization: Tokenization, max_sequence_length: int) -> list[int]:
    """The prompt's tokens, truncated from the left when asked; refused when they leave no room to generate."""
    ids = tokenization.encode(request.prompt, request.messages, request.adapter_id)
    field = "messages" if request.messages else "prompt"
    if not ids:
        raise InvalidRequest("encodes to no tokens", field)
    if request.truncate_input_tokens and len(ids) > request.truncate_input_tokens:
        ids = ids[-request.truncate_input_tokens :]
    if len(ids) >= max_sequence_length:
        raise PromptTooLong(
            f"is {len(ids)} tokens, but the context holds {max_sequence_length} tokens including at least one new "
            f"token; shorten it or set truncate_input_tokens (at most {max_sequence_length - 1})",
            field,
        )
    return ids


def prepare(
    request: GenerationRequest,
    config: EngineConfig,
    tokenization: Tokenization,
    max_sequence_length: int,
) -> PreparedRequest:
    max_new_tokens = check_limits(request, config)
    return PreparedRequest(prompt_ids(request, tokenization, max_sequence_length), max_new_tokens)
