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


# Mistral-Instruct v0.1's template (tokenizer_config.json), which refuses a system role and non-alternating turns.
MISTRAL_V01 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


@pytest.fixture
def mistral_v01(tokenizer):  # type: ignore[no-untyped-def]
    original = tokenizer.chat_template
    tokenizer.chat_template = MISTRAL_V01
    yield ChatTemplateFormat(tokenizer)
    tokenizer.chat_template = original


def test_a_template_without_a_system_role_gets_the_system_message_folded_into_the_first_user_turn(
    mistral_v01,
) -> None:
    text = mistral_v01.render([Message("system", "Answer from the passages."), Message("user", "Why?")])
    assert text.endswith("[INST] Answer from the passages.\n\nWhy? [/INST]")


def test_what_a_template_refuses_is_invalid_argument_in_its_own_words(mistral_v01) -> None:
    with pytest.raises(InvalidRequest, match=r"messages: the model's chat template refuses .* must alternate"):
        mistral_v01.render([Message("user", "Hi"), Message("user", "again")])
    with pytest.raises(InvalidRequest, match="must alternate"):
        mistral_v01.render([Message("system", "a"), Message("system", "b"), Message("user", "c")])
