"""`loraserve data validate` and `loraserve train` as commands: exit codes, rejected.jsonl, YAML configs, dry runs;
and a data-parallel run over two CPU processes (torchrun, gloo) that learns what one process learns from the same
global batches."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from loraserve.trainer.config import TrainConfig
from loraserve.trainer.train import run

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


# Two processes of 2 conversations each step against one process of 2 micro-batches of 2 accumulated: the same
# global batch in the same order. No dropout (each process draws its own masks, which one process cannot replay), and
# 12 training conversations (a quarter of the 16 held out), so that the 6 batches split evenly and no process repeats
# one to even them out.
SAME_GLOBAL_BATCH = {
    "lora_r": 4,
    "lora_alpha": 8.0,
    "lora_dropout": 0.0,
    "learning_rate": 5e-3,
    "eval_fraction": 0.25,
    "epochs": 1,
    "batch_size": 2,
    "sample_max_new_tokens": 2,
}


def test_two_processes_train_and_only_rank_0_writes(small_data: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two gloo processes learn exactly what one process learns from the same global batches: rank 0's adapter is
    the single run's (it would have learnt from its own half of the data without gradient synchronisation), and so
    is the held-out loss, summed over both processes' shards, each evaluated with that process's own weights."""
    output = tmp_path / "ddp"
    settings = [f"--{k.replace('_', '-')}={v}" for k, v in SAME_GLOBAL_BATCH.items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "loraserve.cli", "train", "--data", str(small_data), "--model", str(tiny_model_dir)]
    command += ["--output", str(output), "--device", "cpu", "--gradient-accumulation", "1", "--log-format", "json"]
    result = subprocess.run([*command, *settings], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert not [line for line in lines if '{"time"' in line and not line.startswith('{"time"')], "a glued log line"
    records = [json.loads(line) for line in lines if line.startswith("{")]
    written = [r for r in records if r["message"] == "adapter written"]
    assert len(written) == 1 and written[0]["rank"] == 0
    steps = [(r["rank"], r["step"]) for r in records if r["message"] == "step"]
    assert sorted(steps) == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]  # both processes trained every step
    ddp = json.loads((output / "adapter" / "manifest.json").read_text())["metrics"]
    assert (ddp["steps"], ddp["best_step"]) == (3, 3)  # the adapter is the trained one, not the initial weights

    single = TrainConfig(
        data=str(small_data),
        model=str(tiny_model_dir),
        output=str(tmp_path / "single"),
        device="cpu",
        gradient_accumulation=2,
        **SAME_GLOBAL_BATCH,
    )
    reference = json.loads((run(single) / "manifest.json").read_text())["metrics"]
    assert (reference["steps"], reference["best_step"]) == (3, 3)
    left = load_file(output / "adapter" / "adapter_model.safetensors")
    right = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(left[name], right[name], rtol=1e-4, atol=1e-6, msg=name)
    assert math.isclose(ddp["eval_loss_best"], reference["eval_loss_best"], rel_tol=1e-6)
