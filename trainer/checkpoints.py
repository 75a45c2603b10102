"""Checkpoints that resume a run exactly: the adapter's weights, the optimizer and scheduler, every random number
generator, and where the run was. Nothing is pickled: tensors go to safetensors or `torch.save` state dicts loaded
with weights_only=True, the rest to JSON."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from loraserve.errors import ConfigError
from loraserve.trainer.config import TrainConfig


@dataclass
class RunState:
    """Where a run is, and what it has measured so far."""

    epoch: int = 0
    batch: int = 0  # micro-batches of this epoch already done
    step: int = 0  # optimizer steps done
    best_eval_loss: float | None = None
    best_step: int = -1
    evals_without_improvement: int = 0
    stopped: str = ""  # why training ended early: "early stopping", "max_steps"
    train_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss of the step)
    evals: list[dict[str, float]] = field(default_factory=list)  # {"step", "loss", "perplexity"}
    samples_before: list[dict[str, str]] = field(default_factory=list)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [name, keys.tolist(), pos, has_gauss, cached]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    folder: Path,
    config: TrainConfig,
    state: RunState,
    adapter: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> Path:
    """Write checkpoint step-N under folder (replacing older ones, which are no longer needed)."""
    target = folder / f"step-{state.step:06d}"
    staging = folder / f".{target.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in adapter.items()}, staging / "adapter.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "rng": _rng_state()}, staging / "optimizer.pt")
    (staging / "state.json").write_text(
        json.dumps(
            {
                "state": asdict(state),
                "scheduler": scheduler.state_dict(),
                "config": config.fingerprint(),
                "config_digest": config.digest(),
            },
            indent=1,
            default=float,
        )
    )
    for old in folder.glob("step-*"):
        shutil.rmtree(old)
    staging.rename(target)
    return target


def latest(folder: Path) -> Path | None:
    found = sorted(folder.glob("step-*"))
    return found[-1] if found else None


def load(
    checkpoint: Path, config: TrainConfig, optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[RunState, dict[str, torch.Tensor]]:
    """Restore a checkpoint into the optimizer, the scheduler and the RNGs; return the state and adapter weights.
    Refuses a checkpoint made with a different configuration, naming what changed."""
    saved = json.loads((checkpoint / "state.json").read_text())
    if saved["config_digest"] != config.digest():
        now = config.fingerprint()
        changed = [f"{k}: {saved['config'].get(k)!r} -> {now[k]!r}" for k in now if saved["config"].get(k) != now[k]]
        raise ConfigError(f"--resume: {checkpoint} was made with a different config ({'; '.join(changed)})")
    extra = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    _restore_rng(extra["rng"])
    state = RunState(**saved["state"])
    state.train_losses = [tuple(x) for x in state.train_losses]  # type: ignore[misc]
    return state, load_file(checkpoint / "adapter.safetensors")
