"""`loraserve data validate` and `loraserve train` as commands: exit codes, rejected.jsonl, YAML configs, dry runs;
and a data-parallel run over two CPU processes (torchrun, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def loraserve(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loraserve.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=env or dict(os.environ),
    )


def test_data_validate_reports_and_writes_rejections(small_data: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    rejected = tmp_path / "rejected.jsonl"
    result = loraserve("data", "validate", str(small_data), "--model", str(tiny_model_dir), "--rejected", str(rejected))
    assert result.returncode == 0, result.stderr
    assert "format        messages" in result.stdout and "valid         16" in result.stdout
    assert "record 16: messages[0]: the last turn must be the assistant's" in result.stdout
    assert "tokens        min" in result.stdout
    assert json.loads(rejected.read_text())["index"] == 16


def test_data_validate_fails_when_nothing_valid_is_left(tiny_model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"text": "### Human: only a question"}] * 2))
    result = loraserve(
        "data", "validate", str(bad), "--model", str(tiny_model_dir), "--rejected", str(tmp_path / "r.jsonl")
    )
    assert result.returncode == 1 and "no valid conversations left" in result.stderr
    assert "the last turn must be the assistant's" in result.stdout
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps([{"prompt": "x"}]))
    result = loraserve("data", "validate", str(unknown), "--model", str(tiny_model_dir))
    assert result.returncode == 1 and "expected 'messages'" in result.stderr


def test_train_reads_yaml_lets_flags_win_and_dry_runs(tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text("data: some.jsonl\nlora_r: 8\nepochs: 5\ntarget_modules: [q_proj, k_proj]\n")
    env = dict(os.environ, LORASERVE_EPOCHS="6")
    result = loraserve("train", "--config", str(config), "--lora-r", "16", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert (resolved["lora_r"], resolved["epochs"], resolved["target_modules"]) == (16, 6, "q_proj,k_proj")
    assert resolved["lora_alpha"] == 16.0 and resolved["lora_dropout"] == 0.1  # the seed design's defaults
    config.write_text("data: some.jsonl\nlearning_rat: 0.1\n")
    result = loraserve("train", "--config", str(config), "--dry-run")
    assert result.returncode == 2 and "unknown key(s) learning_rat" in result.stderr


def test_two_processes_train_and_only_rank_0_writes(small_data: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "loraserve.cli",
        "train",
        "--data",
        str(small_data),
        "--model",
        str(tiny_model_dir),
        "--output",
        str(output),
        "--device",
        "cpu",
        "--lora-r",
        "4",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--gradient-accumulation",
        "1",
        "--sample-max-new-tokens",
        "2",
        "--log-format",
        "json",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert not [line for line in lines if '{"time"' in line and not line.startswith('{"time"')], "a glued log line"
    records = [json.loads(line) for line in lines if line.startswith("{")]
    written = [r for r in records if r["message"] == "adapter written"]
    assert len(written) == 1 and written[0]["rank"] == 0
    steps = [r for r in records if r["message"] == "step"]
    assert {r["rank"] for r in steps} == {0, 1}  # both processes trained
    assert (
        max(r["step"] for r in steps)
        == json.loads((output / "adapter" / "manifest.json").read_text())["metrics"]["steps"]
    )
    assert (output / "adapter" / "manifest.json").is_file()
