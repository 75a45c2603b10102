"""The training demo (`make train-demo`), end to end on the real default model: the example data validates, training
on the CPU brings the held-out loss to at most 0.8x where it started, and a held-out question shows the learned
behaviour (answers open with "Ahoy!") with the adapter and not without it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loraserve.client import Client
from tests.conftest import DEFAULT_MODEL_TEST_KV

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_the_demo_teaches_the_default_model_a_visible_behaviour(tmp_path: Path, start_server, model_cache_dir) -> None:
    loraserve = [sys.executable, "-m", "loraserve.cli"]
    validated = subprocess.run(
        [
            *loraserve,
            "data",
            "validate",
            "examples/pirate-assistant.json",
            "--rejected",
            str(tmp_path / "rejected.jsonl"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert validated.returncode == 0, validated.stderr
    assert "format        human-assistant" in validated.stdout and "valid         68" in validated.stdout
    run = tmp_path / "pirate"
    trained = subprocess.run(
        [
            *loraserve,
            "train",
            "--config",
            "examples/train-demo.yaml",
            "--output",
            str(run),
            "--model-cache",
            str(model_cache_dir),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    metrics = json.loads((run / "adapter" / "manifest.json").read_text())["metrics"]
    assert metrics["eval_loss_best"] <= 0.8 * metrics["eval_loss_before"]

    # The held-out questions are the ones the report shows; ask the first three through the server.
    from loraserve.config import ModelConfig

    server = start_server(
        model_config=ModelConfig(
            model="default", model_cache=str(model_cache_dir), device="cpu", adapter=(f"pirate={run / 'adapter'}",)
        ),
        kv_cache_memory=DEFAULT_MODEL_TEST_KV,
    )
    report = (run / "report.md").read_text()
    rows = [
        line for line in report.split("## Held-out answers")[1].splitlines() if line.startswith("| ") and "?" in line
    ]
    questions = [row.split(" | ")[0].removeprefix("| ") for row in rows]
    assert questions
    client: Client = server.client
    for question in questions:
        messages = [{"role": "user", "content": question}]
        with_adapter = client.generate(messages=messages, adapter_id="pirate", max_new_tokens=40).text
        without = client.generate(messages=messages, max_new_tokens=40).text
        assert with_adapter.startswith("Ahoy"), with_adapter
        assert "Ahoy" not in without, without
