"""Training sequences on the real SmolLM2 tokenizer: labels on assistant turns only, an EOS at the end of each, the
prompt tokenized exactly as the server tokenizes it, and length limits."""

from __future__ import annotations

import pytest
import torch

from loraserve.prompting import Message, load_prompt_format
from loraserve.server.engine.tokenization import Tokenization
from loraserve.trainer.examples import IGNORE, LabelError, build_example
from loraserve.trainer.train import collate

CHAT = (
    Message("user", "What is the capital of France?"),
    Message("assistant", "Ahoy! Paris. Fair winds!"),
    Message("user", "And of Spain?"),
    Message("assistant", "Ahoy! Madrid. Fair winds!"),
)


def learned_spans(example) -> list[list[int]]:  # type: ignore[no-untyped-def]
    spans, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label == IGNORE:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return spans + ([current] if current else [])


@pytest.mark.parametrize("fmt", ["chat-template", "human-assistant"])
def test_only_assistant_turns_are_learned_and_each_ends_with_eos(tokenizer, fmt: str) -> None:
    prompt_format = load_prompt_format(fmt, tokenizer)
    example, count, action = build_example(CHAT, tokenizer, prompt_format, tokenizer.eos_token_id, 512, "drop")
    assert example is not None and action == "" and count == len(example.input_ids)
    spans = learned_spans(example)
    assert len(spans) == 2
    for span, turn in zip(spans, (CHAT[1], CHAT[3]), strict=True):
        assert span[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(span[:-1]).strip() == turn.content


@pytest.mark.parametrize("fmt", ["chat-template", "human-assistant"])
def test_the_prompt_is_tokenized_exactly_as_the_server_does(tokenizer, fmt: str) -> None:
    prompt_format = load_prompt_format(fmt, tokenizer)
    example, _, _ = build_example(CHAT[:2], tokenizer, prompt_format, tokenizer.eos_token_id, 512, "drop")
    served = Tokenization(tokenizer, prompt_format).encode(messages=CHAT[:1])
    assert example.input_ids[: len(served)] == served
    assert all(label == IGNORE for label in example.labels[: len(served)])
    assert example.labels[len(served)] != IGNORE  # the answer starts right where the served prompt ends


def test_the_whole_dialog_can_be_learned(tokenizer) -> None:
    prompt_format = load_prompt_format("chat-template", tokenizer)
    example, _, _ = build_example(
        CHAT, tokenizer, prompt_format, tokenizer.eos_token_id, 512, "drop", train_on_all=True
    )
    assert sum(label == IGNORE for label in example.labels) < len(example.labels) // 4  # only what follows EOS


def test_a_format_without_eos_is_refused(tokenizer) -> None:
    no_eos = load_prompt_format("human-assistant", tokenizer)
    no_eos.end_of_turn = ""
    with pytest.raises(LabelError, match="never learn to stop"):
        build_example(CHAT, tokenizer, no_eos, tokenizer.eos_token_id, 512, "drop")


def test_too_long_conversations_are_dropped_truncated_to_whole_turns_or_refused(tokenizer) -> None:
    prompt_format = load_prompt_format("chat-template", tokenizer)
    full, total, _ = build_example(CHAT, tokenizer, prompt_format, tokenizer.eos_token_id, 512, "drop")
    limit = total - 5
    dropped, _, action = build_example(CHAT, tokenizer, prompt_format, tokenizer.eos_token_id, limit, "drop")
    assert dropped is None and action == "dropped"
    cut, _, action = build_example(CHAT, tokenizer, prompt_format, tokenizer.eos_token_id, limit, "truncate")
    assert action == "truncated" and len(cut.input_ids) <= limit
    assert len(learned_spans(cut)) == 1 and cut.input_ids == full.input_ids[: len(cut.input_ids)]
    assert [label for label in cut.labels if label != IGNORE][-1] == tokenizer.eos_token_id
    with pytest.raises(LabelError, match="max_length"):
        build_example(CHAT, tokenizer, prompt_format, tokenizer.eos_token_id, limit, "error")
    nothing, _, action = build_example(CHAT, tokenizer, prompt_format, tokenizer.eos_token_id, 10, "truncate")
    assert nothing is None and action == "dropped"


def test_padding_is_masked_by_position_so_eos_labels_survive(tokenizer) -> None:
    """SmolLM2's pad token is its EOS token: masking padding by id would erase the EOS the model must learn."""
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    prompt_format = load_prompt_format("chat-template", tokenizer)
    short, _, _ = build_example(CHAT[:2], tokenizer, prompt_format, tokenizer.eos_token_id, 512, "drop")
    long, _, _ = build_example(CHAT, tokenizer, prompt_format, tokenizer.eos_token_id, 512, "drop")
    batch = collate([short, long], tokenizer.pad_token_id, torch.device("cpu"))
    n = len(short.input_ids)
    assert batch["attention_mask"][0, :n].all() and not batch["attention_mask"][0, n:].any()
    assert (batch["labels"][0, n:] == IGNORE).all()
    assert batch["labels"][0].tolist()[:n] == short.labels and tokenizer.eos_token_id in batch["labels"][0].tolist()
