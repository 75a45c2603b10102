"""Fixtures for training tests: a small conversation file and a fast configuration on the tiny model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from loraserve.trainer.config import TrainConfig


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 conversations (two of them two-turn) in the messages format, plus one bad record."""
    records = []
    for i in range(14):
        records.append(
            {
                "messages": [
                    {"role": "user", "content": f"Question number {i}?"},
                    {"role": "assistant", "content": f"Ahoy! Answer {i}. Fair winds!"},
                ]
            }
        )
    for i in range(2):
        records.append(
            {
                "messages": [
                    {"role": "user", "content": f"First {i}?"},
                    {"role": "assistant", "content": "Ahoy! One. Fair winds!"},
                    {"role": "user", "content": "Then?"},
                    {"role": "assistant", "content": "Ahoy! Two. Fair winds!"},
                ]
            }
        )
    records.append({"messages": [{"role": "user", "content": "no answer"}]})
    path = tmp_path_factory.mktemp("data") / "small.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.fixture
def train_config(tiny_model_dir: Path, small_data: Path, tmp_path: Path) -> TrainConfig:
    return replace(
        TrainConfig(),
        data=str(small_data),
        output=str(tmp_path / "run"),
        model=str(tiny_model_dir),
        device="cpu",
        lora_r=4,
        lora_alpha=8.0,
        epochs=2,
        batch_size=2,
        gradient_accumulation=2,
        learning_rate=5e-3,
        eval_fraction=0.2,
        sample_max_new_tokens=4,
    )
