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
    """The part of a Hugging Face tokenizer the prompt formats need."""

    chat_template: Any
    eos_token: Any

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


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered conversation: an assistant turn (what training learns), or the context before one."""

    text: str
    assistant: bool


class PromptFormat(ABC):
    """Renders a conversation to the exact text the model sees."""

    name: str
    # Whether the tokenizer should add its own special tokens (BOS) when encoding the rendered text.
    adds_special_tokens: bool

    @abstractmethod
    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The conversation as model text; add_generation_prompt appends the opening of the assistant's turn."""

    def segments(self, messages: Sequence[Message]) -> list[Segment]:
        """The conversation cut at assistant turns. Joined, the segments are render(messages) exactly, and the text
        before each assistant turn is exactly the prompt the server renders to have that turn generated: what the
        trainer learns from is what the server serves."""
        segments: list[Segment] = []
        done = ""
        for i, message in enumerate(messages):
            if message.role != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            full = self.render(messages[: i + 1], add_generation_prompt=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise ValueError(f"the {self.name} prompt format does not render a conversation turn by turn")
            segments += [Segment(prompt[len(done) :], False), Segment(full[len(prompt) :], True)]
            done = full
        rest = self.render(messages, add_generation_prompt=False)[len(done) :]
        return [*segments, Segment(rest, False)] if rest else segments


def fold_system_message(messages: Sequence[Message]) -> Sequence[Message]:
    """A leading system message prepended to the first user message, for templates without a system role (as
    Mistral's later templates do themselves); the messages unchanged when there is nothing to fold."""
    if len(messages) < 2 or messages[0].role != "system" or messages[1].role != "user":
        return messages
    first = Message("user", f"{messages[0].content}\n\n{messages[1].content}")
    return (first, *messages[2:])


class ChatTemplateFormat(PromptFormat):
    """The tokenizer's own chat template (e.g. ChatML for SmolLM2-Instruct).

    Some templates refuse conversations with `raise_exception` (Mistral-Instruct v0.1/v0.2: no system role, strict
    user/assistant alternation; Llama-2-chat: alternation). A system message such a template refuses is folded into
    the first user message; anything else it refuses is an InvalidRequest with the template's own words."""

    name = "chat-template"
    adds_special_tokens = False  # the template writes its special tokens itself

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        if not tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat template; use the human-assistant prompt format")
        self._tokenizer = tokenizer

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError  # transformers' own dependency; the client-only install has neither

        try:
            return self._apply(messages, add_generation_prompt)
        except TemplateError as error:
            refusal = error
        folded = fold_system_message(messages)
        if folded is not messages:
            try:
                return self._apply(folded, add_generation_prompt)
            except TemplateError:
                pass
        raise InvalidRequest(f"the model's chat template refuses this conversation: {refusal}", "messages")

    def _apply(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        return self._tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )


class HumanAssistantFormat(PromptFormat):
    """The prototype's "### Human: / ### Assistant:" format; a system message becomes a leading paragraph, and each
    assistant turn ends with end_of_turn (the tokenizer's EOS token), which is what teaches a model to stop."""

    name = "human-assistant"
    adds_special_tokens = True

    def __init__(self, end_of_turn: str = "") -> None:
        self.end_of_turn = end_of_turn

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        parts = []
        for message in messages:
            if message.role == "system":
                parts.append(f"{message.content}\n\n")
            elif message.role == "user":
                parts.append(f"{HUMAN_TAG} {message.content}\n")
            else:
                parts.append(f"{ASSISTANT_TAG} {message.content}{self.end_of_turn}\n")
        if add_generation_prompt:
            parts.append(ASSISTANT_TAG)
        return "".join(parts)


def load_prompt_format(name: str, tokenizer: ChatTokenizer) -> PromptFormat:
    """The format called `name`; "auto" is the tokenizer's chat template when it has one, else human-assistant."""
    if name not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {name!r}; use one of {', '.join(PROMPT_FORMATS)}")
    if name == "chat-template" or (name == "auto" and tokenizer.chat_template):
        return ChatTemplateFormat(tokenizer)
    return HumanAssistantFormat(end_of_turn=tokenizer.eos_token or "")
