"""Training end to end on the tiny model: artifacts the server loads, reproducibility, exact resume, refusals."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraserve.config import ModelConfig
from loraserve.errors import ConfigError
from loraserve.trainer import train as training
from loraserve.trainer.artifacts import verify
from loraserve.trainer.config import TrainConfig
from loraserve.trainer.train import NotEnoughData, run


def same_weights(a: Path, b: Path) -> bool:
    left, right = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return left.keys() == right.keys() and all(left[k].equal(right[k]) for k in left)


def test_a_run_writes_what_the_server_reads(train_config: TrainConfig, tiny_model_dir: Path) -> None:
    adapter = run(train_config)
    output = adapter.parent
    manifest = verify(adapter)  # every file matches its sha256
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "loraserve.json"} <= set(
        manifest["files"]
    )
    assert manifest["data"]["valid"] == 16 and manifest["data"]["rejected"] == 1
    assert manifest["base_model"]["weights_sha256"] and manifest["versions"]["peft"]
    assert manifest["metrics"]["train_examples"] + manifest["metrics"]["eval_examples"] == 16
    assert json.loads((adapter / "loraserve.json").read_text()) == {"prompt_format": "chat-template"}
    assert [json.loads(line)["index"] for line in (output / "rejected.jsonl").read_text().splitlines()] == [16]
    report = (output / "report.md").read_text()
    for section in ("## Data", "## Metrics", "## Held-out answers", "## Reload check", "## Configuration"):
        assert section in report
    assert (output / "loss_curve.png").stat().st_size > 0

    from loraserve.config import EngineConfig
    from loraserve.prompting import Message
    from loraserve.server.engine.engine import Engine
    from loraserve.server.engine.params import GenerationRequest, StoppingParams
    from loraserve.server.models.loading import load_model

    loaded = load_model(ModelConfig(model=str(tiny_model_dir), adapter=(f"trained={adapter}",), device="cpu"))
    info = loaded.lora_adapters[0].info
    assert (info.rank, info.alpha, info.target_modules, info.prompt_format) == (
        4,
        8.0,
        ("q_proj", "v_proj"),
        "chat-template",
    )
    engine = Engine(loaded, EngineConfig(kv_cache_memory="64MB"))
    engine.start()
    try:
        result = engine.submit(
            GenerationRequest(
                messages=(Message("user", "Hi"),),
                adapter_id="trained",
                stopping=StoppingParams(max_new_tokens=3, min_new_tokens=3),
            )
        ).result()
        assert result.generated_token_count == 3
    finally:
        engine.stop()


def test_the_same_config_and_data_give_the_same_adapter(train_config: TrainConfig, tmp_path: Path) -> None:
    first = run(replace(train_config, output=str(tmp_path / "one"), epochs=1))
    second = run(replace(train_config, output=str(tmp_path / "two"), epochs=1))
    assert same_weights(first, second)
    other_seed = run(replace(train_config, output=str(tmp_path / "three"), epochs=1, seed=7))
    assert not same_weights(first, other_seed)


def last_checkpoint(output: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """The run's last checkpoint (older ones are removed): its state.json, adapter weights and optimizer.pt (the
    optimizer's state and every random number generator's)."""
    [folder] = (output / "checkpoints").glob("step-*")
    state = json.loads((folder / "state.json").read_text())
    return state, load_file(folder / "adapter.safetensors"), torch.load(folder / "optimizer.pt", weights_only=True)


def assert_same(left: object, right: object, where: str = "") -> None:
    """Exact equality of nested dicts, lists and tensors."""
    if isinstance(left, torch.Tensor):
        assert isinstance(right, torch.Tensor) and left.dtype == right.dtype and left.equal(right), where
    elif isinstance(left, dict):
        assert isinstance(right, dict) and left.keys() == right.keys(), where
        for key in left:
            assert_same(left[key], right[key], f"{where}/{key}")
    elif isinstance(left, list | tuple):
        assert isinstance(right, list | tuple) and len(left) == len(right), where
        for i, (a, b) in enumerate(zip(left, right, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert left == right, f"{where}: {left!r} != {right!r}"


def test_resume_continues_exactly(train_config: TrainConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run interrupted after step 3 and resumed from its step-2 checkpoint ends exactly where the same run without
    the interruption ends: the last weights, the optimizer's moments and step, the scheduler, the random number
    generators, the loss history. With this learning rate the best adapter is step 2's, taken before the crash, so the
    finished adapter alone would not tell an exact resume from a wrong one: the last checkpoint does."""
    config = replace(train_config, eval_steps=2, early_stopping_patience=0, learning_rate=0.1)
    uninterrupted = run(replace(config, output=str(tmp_path / "whole")))
    interrupted = replace(config, output=str(tmp_path / "resumed"))
    real_step = training.Trainer.optimizer_step
    started: list[int] = []  # the step count before each optimizer step the resumed run takes

    def crash_after_three(self, group):  # type: ignore[no-untyped-def]
        if self.state.step == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_step(self, group)

    def count(self, group):  # type: ignore[no-untyped-def]
        started.append(self.state.step)
        return real_step(self, group)

    monkeypatch.setattr(training.Trainer, "optimizer_step", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        run(interrupted)
    checkpoints = sorted((tmp_path / "resumed" / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-000002"]
    monkeypatch.setattr(training.Trainer, "optimizer_step", count)
    resumed = run(replace(interrupted, resume=True))
    assert started == [2, 3, 4, 5, 6, 7]  # it continued from step 2 (redoing the lost step 3), not from scratch

    whole_state, whole_weights, whole_optimizer = last_checkpoint(tmp_path / "whole")
    resumed_state, resumed_weights, resumed_optimizer = last_checkpoint(tmp_path / "resumed")
    assert whole_state["state"]["step"] == 8 and whole_state["state"]["best_step"] == 2  # the best predates the crash
    assert_same(resumed_weights, whole_weights, "adapter")
    assert_same(resumed_optimizer, whole_optimizer, "optimizer.pt")
    for part in ("state", "scheduler"):  # steps, epoch, loss history, evaluations; the learning rate's schedule
        assert_same(resumed_state[part], whole_state[part], part)
    assert same_weights(uninterrupted, resumed)  # and the finished (best) adapter
    with pytest.raises(ConfigError, match=r"learning_rate: 0\.1 -> 0\.001"):
        run(replace(interrupted, resume=True, learning_rate=1e-3))


def test_resume_without_a_checkpoint_is_refused(train_config: TrainConfig) -> None:
    with pytest.raises(ConfigError, match="no checkpoint"):
        run(replace(train_config, resume=True))


def test_unknown_target_modules_and_qlora_on_cpu_are_refused(train_config: TrainConfig) -> None:
    with pytest.raises(ConfigError, match="c_attn not in this model"):
        run(replace(train_config, target_modules="q_proj,c_attn"))
    with pytest.raises(ConfigError, match="--qlora needs a CUDA device"):
        run(replace(train_config, qlora=True))
    assert TrainConfig(target_modules="all-linear").targets == (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )


def test_data_that_is_mostly_bad_stops_the_run(train_config: TrainConfig, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "only a question"}]}\n' * 3)
    with pytest.raises(NotEnoughData, match="no valid conversations"):
        run(replace(train_config, data=str(bad)))
    with pytest.raises(NotEnoughData, match="more than --max-error-rate"):
        run(replace(train_config, max_error_rate=0.01))
