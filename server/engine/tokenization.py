"""The tokenizer as the engine uses it: rendering and encoding prompts, decoding tokens. One lock guards it, because a
Hugging Face fast tokenizer's settings are mutable state shared by every thread."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from loraserve.prompting import Message, PromptFormat
from loraserve.server.engine.outputs import TokenDetail


class Tokenization:
    """Thread-safe prompt encoding and token decoding for one tokenizer. Messages are rendered with the server's
    prompt format, or with the one an adapter was trained with."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_format: PromptFormat,
        adapter_formats: dict[str, PromptFormat] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.adapter_formats = adapter_formats or {}
        self._lock = threading.Lock()

    def encode(self, prompt: str = "", messages: Sequence[Message] = (), adapter_id: str = "") -> list[int]:
        """Token ids of a raw prompt, or of messages rendered with the prompt format (assistant turn opened)."""
        if messages:
            prompt_format = self.adapter_formats.get(adapter_id, self.prompt_format)
            text = prompt_format.render(messages, add_generation_prompt=True)
            add_special = prompt_format.adds_special_tokens
        else:
            text, add_special = prompt, True
        with self._lock:
            return list(self.tokenizer.encode(text, add_special_tokens=add_special))

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
