"""OpenAI request bodies -> the engine's requests, and the engine's results and chunks -> OpenAI response bodies.
Pure functions, like loraserve.server.convert on the gRPC side: no engine, no I/O."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from loraserve.errors import ModelNotFound
from loraserve.prompting import Message
from loraserve.server.engine.outputs import GenerationChunk, GenerationResult, StopReason, TokenDetail
from loraserve.server.engine.params import (
    MAX_SEED,
    ConstraintKind,
    GenerationRequest,
    OutputConstraint,
    OutputOptions,
    SamplingParams,
    StoppingParams,
)
from loraserve.server.http_api.protocol import ChatCompletionBody, CompletionBody, GenerationBody, ResponseFormat

OPENAI_DEFAULT_TEMPERATURE = 1.0  # OpenAI samples unless told otherwise; gRPC requests default to greedy
FINISH_REASONS = {
    StopReason.EOS_TOKEN: "stop",
    StopReason.STOP_SEQUENCE: "stop",
    StopReason.CONSTRAINT_COMPLETE: "stop",
    StopReason.MAX_TOKENS: "length",
    StopReason.TOKEN_LIMIT: "length",
    StopReason.TIME_LIMIT: "length",
    StopReason.CANCELLED: "abort",
}
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role


def adapter_for(model: str, served_model: str, adapter_ids: Iterable[str]) -> str:
    """The adapter id a `model` names: "" for the served model itself, else a loaded adapter's id."""
    if model == served_model:
        return ""
    if model in set(adapter_ids):
        return model
    raise ModelNotFound(
        f"the model {model!r} does not exist: GET /v1/models lists the served model ({served_model!r}) and the "
        "loaded adapters"
    )


def constraint_of(response_format: ResponseFormat | None) -> OutputConstraint | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return OutputConstraint(ConstraintKind.JSON_OBJECT)
    assert response_format.json_schema is not None  # the model's validator requires it
    return OutputConstraint(ConstraintKind.JSON_SCHEMA, json.dumps(response_format.json_schema.json_schema))


def _sampling(body: GenerationBody, index: int) -> SamplingParams:
    """Choice `index`'s sampling: with a seed, choice i uses seed + i, so n choices differ and repeat."""
    return SamplingParams(
        temperature=body.temperature if body.temperature is not None else OPENAI_DEFAULT_TEMPERATURE,
        top_k=body.top_k or 0,
        top_p=body.top_p if body.top_p is not None else 1.0,
        seed=(body.seed + index) % (MAX_SEED + 1) if body.seed is not None else None,  # choices wrap round
        repetition_penalty=body.repetition_penalty or 1.0,
    )


def _request_id(request_id: str, index: int, total: int) -> str:
    return request_id if total == 1 else f"{request_id}-{index}"


def _choices(
    body: GenerationBody,
    adapter_id: str,
    request_id: str,
    inputs: Sequence[dict[str, Any]],
    max_new_tokens: int | None,
    output: OutputOptions,
) -> list[GenerationRequest]:
    """n engine requests per input (a prompt or a conversation), in OpenAI's order: choice = input index * n + i."""
    stopping = StoppingParams(
        max_new_tokens=max_new_tokens, min_new_tokens=body.min_tokens or 0, stop_sequences=body.stop_sequences
    )
    constraint = constraint_of(body.response_format)
    total = len(inputs) * body.n
    return [
        GenerationRequest(
            **given,
            adapter_id=adapter_id,
            sampling=_sampling(body, i),
            stopping=stopping,
            output=output,
            constraint=constraint,
            request_id=_request_id(request_id, p * body.n + i, total),
        )
        for p, given in enumerate(inputs)
        for i in range(body.n)
    ]


def chat_requests(body: ChatCompletionBody, adapter_id: str, request_id: str) -> list[GenerationRequest]:
    messages = tuple(Message(ROLE_ALIASES.get(m.role, m.role), m.text) for m in body.messages)
    output = OutputOptions(token_ids=body.logprobs, logprobs=body.logprobs, top_n=body.top_logprobs or 0)
    return _choices(body, adapter_id, request_id, [{"messages": messages}], body.token_limit, output)


def completion_requests(body: CompletionBody, adapter_id: str, request_id: str) -> list[GenerationRequest]:
    wants = body.logprobs is not None
    output = OutputOptions(token_ids=wants, logprobs=wants, top_n=body.logprobs or 0)
    prompts = [{"prompt": prompt} for prompt in body.prompts]
    return _choices(body, adapter_id, request_id, prompts, body.max_tokens, output)


def finish_reason(reason: StopReason | None) -> str | None:
    return FINISH_REASONS[reason] if reason is not None else None


def usage(results: Sequence[GenerationResult | GenerationChunk], per_prompt: int) -> dict[str, Any]:
    """Token counts over every choice; results are prompt-major with `per_prompt` choices each, and a prompt shared
    by n choices is counted once, as OpenAI counts it."""
    firsts = results[::per_prompt]
    prompt_tokens = sum(r.input_token_count for r in firsts)
    completion_tokens = sum(r.generated_token_count for r in results)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(r.cached_input_token_count for r in firsts)},
    }


def _token_bytes(text: str) -> list[int]:
    return list(text.encode())


def chat_logprobs(tokens: Sequence[TokenDetail]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": t.text,
                "logprob": t.logprob,
                "bytes": _token_bytes(t.text),
                "top_logprobs": [
                    {"token": top.text, "logprob": top.logprob, "bytes": _token_bytes(top.text)} for top in t.top_tokens
                ],
            }
            for t in tokens
        ]
    }


def completion_logprobs(tokens: Sequence[TokenDetail], text_offset: int) -> dict[str, Any]:
    offsets, position = [], text_offset
    for t in tokens:
        offsets.append(position)
        position += len(t.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{top.text: top.logprob for top in t.top_tokens} for t in tokens],
        "text_offset": offsets,
    }


def _envelope(kind: str, request_id: str, model: str, created: int, choices: list[dict[str, Any]]) -> dict[str, Any]:
    """What every response and chunk carries around its choices; `kind` is OpenAI's `object`."""
    prefix = "chatcmpl" if kind.startswith("chat.") else "cmpl"
    return {"id": f"{prefix}-{request_id}", "object": kind, "created": created, "model": model, "choices": choices}


def chat_response(
    request_id: str, model: str, created: int, results: Sequence[GenerationResult], wants_logprobs: bool
) -> dict[str, Any]:
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": r.text},
            "logprobs": chat_logprobs(r.tokens) if wants_logprobs else None,
            "finish_reason": finish_reason(r.stop_reason),
        }
        for i, r in enumerate(results)
    ]
    return _envelope("chat.completion", request_id, model, created, choices) | {"usage": usage(results, len(results))}


def completion_response(
    request_id: str, model: str, created: int, results: Sequence[GenerationResult], body: CompletionBody
) -> dict[str, Any]:
    choices = [
        {
            "index": i,
            "text": r.text,
            "logprobs": completion_logprobs(r.tokens, 0) if body.logprobs is not None else None,
            "finish_reason": finish_reason(r.stop_reason),
        }
        for i, r in enumerate(results)
    ]
    return _envelope("text_completion", request_id, model, created, choices) | {"usage": usage(results, body.n)}


def chat_chunk(
    request_id: str,
    model: str,
    created: int,
    index: int,
    chunk: GenerationChunk | None,
    wants_logprobs: bool,
) -> dict[str, Any]:
    """A chat.completion.chunk: the assistant role first (chunk None), then each chunk's text."""
    if chunk is None:
        choice = {
            "index": index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    else:
        choice = {
            "index": index,
            "delta": {"content": chunk.text} if chunk.text else {},
            "logprobs": chat_logprobs(chunk.tokens) if wants_logprobs else None,
            "finish_reason": finish_reason(chunk.stop_reason),
        }
    return _envelope("chat.completion.chunk", request_id, model, created, [choice])


def completion_chunk(
    request_id: str, model: str, created: int, index: int, chunk: GenerationChunk, text_offset: int, logprobs: bool
) -> dict[str, Any]:
    choice = {
        "index": index,
        "text": chunk.text,
        "logprobs": completion_logprobs(chunk.tokens, text_offset) if logprobs else None,
        "finish_reason": finish_reason(chunk.stop_reason),
    }
    return _envelope("text_completion", request_id, model, created, [choice])


def usage_chunk(request_id: str, model: str, created: int, kind: str, usage_fields: dict[str, Any]) -> dict[str, Any]:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage of the whole request."""
    return _envelope(kind, request_id, model, created, []) | {"usage": usage_fields}
