"""The prompt format: how a conversation becomes model text. The trainer and the server both render with this module,
so the text an adapter is trained on is the text it is served with."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from loraserve.errors import InvalidRequest

ROLES = ("system", "user", "assistant")
PROMPT_FORMATS = ("auto", "chat-template", "human-assistant")

# The Flask prototype's training format (claude4_style_data.json): "### Human: ... ### Assistant: ...".
HUMAN_TAG = "### Human:"
ASSISTANT_TAG = "### Assistant:"


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: str
    content: str


class ChatTokenizer(Protocol):
    """The part of a Hugging Face tokenizer the chat-template format needs."""

    chat_template: Any

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...


def to_messages(items: Iterable[Message | Mapping[str, str]]) -> tuple[Message, ...]:
    """Accept Message objects or {"role", "content"} mappings."""
    return tuple(m if isinstance(m, Message) else Message(role=m["role"], content=m["content"]) for m in items)


def validate_messages(messages: Sequence[Message], field: str = "messages") -> None:
    """Raise InvalidRequest naming the first bad message: unknown role or empty content."""
    if not messages:
        raise InvalidRequest("must contain at least one message", field=field)
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise InvalidRequest(f"unknown role {message.role!r}; use one of {', '.join(ROLES)}", f"{field}[{i}].role")
        if not message.content.strip():
            raise InvalidRequest("must not be empty", field=f"{field}[{i}].content")


class PromptFormat(ABC):
    """Renders a conversation to the exact text the model sees."""

    name: str

    @abstractmethod
    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The conversation as model text; add_generation_prompt appends the opening of the assistant's turn."""


class ChatTemplateFormat(PromptFormat):
    """The tokenizer's own chat template (e.g. ChatML for SmolLM2-Instruct)."""

    name = "chat-template"

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        if not tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat template; use the human-assistant prompt format")
        self._tokenizer = tokenizer

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        return self._tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )


class HumanAssistantFormat(PromptFormat):
    """The prototype's "### Human: / ### Assistant:" format; a system message becomes a leading paragraph."""

    name = "human-assistant"

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        parts = []
        for message in messages:
            if message.role == "system":
                parts.append(f"{message.content}\n\n")
            elif message.role == "user":
                parts.append(f"{HUMAN_TAG} {message.content}\n")
            else:
                parts.append(f"{ASSISTANT_TAG} {message.content}\n")
        if add_generation_prompt:
            parts.append(ASSISTANT_TAG)
        return "".join(parts)


def load_prompt_format(name: str, tokenizer: ChatTokenizer) -> PromptFormat:
    """The format called `name`; "auto" is the tokenizer's chat template when it has one, else human-assistant."""
    if name not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {name!r}; use one of {', '.join(PROMPT_FORMATS)}")
    if name == "chat-template" or (name == "auto" and tokenizer.chat_template):
        return ChatTemplateFormat(tokenizer)
    return HumanAssistantFormat()
