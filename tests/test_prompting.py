"""The shared prompt format: rendering, validation, and how "auto" picks a format."""

from __future__ import annotations

import pytest

from loraserve.errors import InvalidRequest
from loraserve.prompting import (
    ChatTemplateFormat,
    HumanAssistantFormat,
    Message,
    load_prompt_format,
    to_messages,
    validate_messages,
)


def test_human_assistant_ends_assistant_turns_with_the_end_of_turn_token() -> None:
    text = HumanAssistantFormat(end_of_turn="</s>").render([Message("user", "Hi"), Message("assistant", "Yo")])
    assert text == "### Human: Hi\n### Assistant: Yo</s>\n### Assistant:"


def test_human_assistant_renders_the_prototype_format() -> None:
    messages = [
        Message("system", "Be brief."),
        Message("user", "Hi"),
        Message("assistant", "Hello!"),
        Message("user", "Capital of France?"),
    ]
    text = HumanAssistantFormat().render(messages)
    assert text == "Be brief.\n\n### Human: Hi\n### Assistant: Hello!\n### Human: Capital of France?\n### Assistant:"


def test_human_assistant_without_generation_prompt_ends_after_the_last_turn() -> None:
    text = HumanAssistantFormat().render(
        [Message("user", "Hi"), Message("assistant", "Yo")], add_generation_prompt=False
    )
    assert text == "### Human: Hi\n### Assistant: Yo\n"


def test_chat_template_uses_the_tokenizers_template(tokenizer) -> None:
    text = ChatTemplateFormat(tokenizer).render([Message("user", "Hi")])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_auto_prefers_the_chat_template_and_falls_back(tokenizer) -> None:
    assert load_prompt_format("auto", tokenizer).name == "chat-template"
    assert load_prompt_format("human-assistant", tokenizer).name == "human-assistant"

    class NoTemplate:
        chat_template = None
        eos_token = "</s>"

    assert load_prompt_format("auto", NoTemplate()).name == "human-assistant"
    with pytest.raises(ValueError, match="no chat template"):
        load_prompt_format("chat-template", NoTemplate())
    with pytest.raises(ValueError, match="unknown prompt format"):
        load_prompt_format("alpaca", tokenizer)


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([], "messages"),
        ([Message("robot", "hi")], "messages[0].role"),
        ([Message("user", "hi"), Message("assistant", "  ")], "messages[1].content"),
    ],
)
def test_bad_messages_name_the_field(messages: list[Message], field: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        validate_messages(messages)
    assert error.value.field == field
    assert str(error.value).startswith(field + ": ")


def test_to_messages_accepts_mappings_and_messages() -> None:
    assert to_messages([{"role": "user", "content": "a"}, Message("assistant", "b")]) == (
        Message("user", "a"),
        Message("assistant", "b"),
    )


CONVERSATION = [
    Message("system", "Be brief."),
    Message("user", "Hi"),
    Message("assistant", "Hello!"),
    Message("user", "Capital of France?"),
    Message("assistant", "Paris."),
]


@pytest.mark.parametrize("fmt", ["chat-template", "human-assistant"])
def test_segments_add_up_to_the_rendering_and_each_prompt_is_what_the_server_sends(tokenizer, fmt: str) -> None:
    prompt_format = load_prompt_format(fmt, tokenizer)
    segments = prompt_format.segments(CONVERSATION)
    assert "".join(s.text for s in segments) == prompt_format.render(CONVERSATION, add_generation_prompt=False)
    assert [s.assistant for s in segments] == [False, True, False, True]
    # The text before the second assistant turn is exactly the server's prompt for that turn.
    served = prompt_format.render(CONVERSATION[:4], add_generation_prompt=True)
    assert "".join(s.text for s in segments[:3]) == served
    assert segments[3].text.startswith(("Paris.", " Paris.")) and tokenizer.eos_token in segments[3].text
