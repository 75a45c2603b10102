"""The tokenizer as the engine uses it: rendering and encoding prompts, decoding tokens. One lock guards it, because a
Hugging Face fast tokenizer's settings are mutable state shared by every thread.

The engine thread decodes with a copy of its own (`private_copy`): encoding a long prompt on an RPC thread then never
holds up the running streams' next tokens."""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from loraserve.errors import InvalidRequest
from loraserve.prompting import Message, PromptFormat
from loraserve.server.engine.outputs import TokenDetail


@dataclass(frozen=True)
class InputLimits:
    """What an input may be before it is rendered and tokenized (0: no bound): rendering and tokenizing are linear in
    the input, tokenizing holds the lock, and a 12 MB prompt took seconds to be told it was too long."""

    max_chars: int = 0  # of the text, or of the messages' contents, and again of the rendered conversation
    max_messages: int = 0  # each message renders to a token or more: more than the context has tokens never fit


class Tokenization:
    """Thread-safe prompt encoding and token decoding for one tokenizer. Messages are rendered with the server's
    prompt format, or with the one an adapter was trained with."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_format: PromptFormat,
        adapter_formats: dict[str, PromptFormat] | None = None,
        limits: InputLimits = InputLimits(),
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.adapter_formats = adapter_formats or {}
        self.limits = limits
        self._lock = threading.Lock()

    def private_copy(self) -> Tokenization:
        """The same tokenization on a copy of the tokenizer, with a lock of its own."""
        with self._lock:
            tokenizer = copy.deepcopy(self.tokenizer)
        return Tokenization(tokenizer, self.prompt_format, self.adapter_formats, self.limits)

    def encode(
        self, prompt: str = "", messages: Sequence[Message] = (), adapter_id: str = "", field: str = "prompt"
    ) -> list[int]:
        """Token ids of a raw prompt, or of messages rendered with the prompt format (assistant turn opened); an input
        over the limits is InvalidRequest naming `field` (or messages) before anything is rendered or tokenized."""
        field = "messages" if messages else field
        self._check_size(len(prompt) + sum(len(m.content) for m in messages), field, "")
        if messages:
            if self.limits.max_messages and len(messages) > self.limits.max_messages:
                raise InvalidRequest(
                    f"has {len(messages)} messages; at most {self.limits.max_messages} fit the model's context", field
                )
            prompt_format = self.adapter_formats.get(adapter_id, self.prompt_format)
            text = prompt_format.render(messages, add_generation_prompt=True)
            self._check_size(len(text), field, " once rendered with the prompt format")
            add_special = prompt_format.adds_special_tokens
        else:
            text, add_special = prompt, True
        with self._lock:
            return list(self.tokenizer.encode(text, add_special_tokens=add_special))

    def _check_size(self, size: int, field: str, where: str) -> None:
        if self.limits.max_chars and size > self.limits.max_chars:
            raise InvalidRequest(
                f"is {size} characters{where}; at most {self.limits.max_chars} are allowed (the server's "
                "--max-input-chars), checked before it is tokenized",
                field,
            )

    def decode(self, token_ids: list[int]) -> str:
        with self._lock:
            return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        """Each token's own text (special tokens included, partial UTF-8 shown as U+FFFD)."""
        with self._lock:
            return [self.tokenizer.decode([token_id]) for token_id in token_ids]

    def details(self, token_ids: Sequence[int]) -> tuple[TokenDetail, ...]:
        texts = self.token_texts(token_ids)
        return tuple(TokenDetail(id=i, text=t) for i, t in zip(token_ids, texts, strict=True))
