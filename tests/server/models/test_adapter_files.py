"""Hostile or broken adapter folders: every one is a ConfigError naming the file and the problem (LoadAdapter answers
INVALID_ARGUMENT), never an unexpected exception (INTERNAL), and nothing of it reaches the engine."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraserve.errors import ConfigError
from loraserve.server.models.adapters.files import read_adapter
from loraserve.server.models.adapters.spec import AdapterSpec

PROJECTIONS = {"q_proj": (64, 64), "v_proj": (64, 32)}  # the tiny model's (conftest.tiny_llama_config)
WEIGHTS = "adapter_model.safetensors"


def edit_config(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / "adapter_config.json"
        config = json.loads(path.read_text())
        replaced = change(config)
        path.write_text(json.dumps(config if replaced is None else replaced))

    return edit


def edit_weights(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        tensors = load_file(folder / WEIGHTS)
        change(tensors)
        save_file(tensors, folder / WEIGHTS)

    return edit


def first_a(tensors: dict[str, torch.Tensor]) -> str:
    return sorted(k for k in tensors if "lora_A" in k)[0]


CASES = {
    "config not JSON": (lambda f: (f / "adapter_config.json").write_bytes(b"\xff{"), "is not JSON"),
    "config a list": (edit_config(lambda c: [c]), "must be a JSON object"),
    "rank missing": (edit_config(lambda c: c.__delitem__("r")), "r must be an integer in"),
    "rank a string": (edit_config(lambda c: c.update(r="8")), "r must be an integer in"),
    "rank zero": (edit_config(lambda c: c.update(r=0)), "r must be an integer in"),
    "rank 2**63": (edit_config(lambda c: c.update(r=2**63)), "r must be an integer in"),  # beyond the contract's uint32
    "alpha 1e300": (edit_config(lambda c: c.update(lora_alpha=1e300)), "would overflow"),
    "huge finite weights": (
        edit_weights(lambda t: t.__setitem__(first_a(t), t[first_a(t)] * 3e38 / t[first_a(t)].abs().max())),
        "would overflow",
    ),
    "alpha NaN": (
        lambda f: (f / "adapter_config.json").write_text(
            (f / "adapter_config.json").read_text().replace('"lora_alpha": 16', '"lora_alpha": NaN')
        ),
        "lora_alpha must be a finite number",
    ),
    "weights garbage": (lambda f: (f / WEIGHTS).write_bytes(b"\x00" * 64), "not a valid safetensors file"),
    "a NaN weight": (edit_weights(lambda t: t[first_a(t)].view(-1).__setitem__(0, float("nan"))), "NaN or infinite"),
    "an inf weight": (edit_weights(lambda t: t[first_a(t)].view(-1).__setitem__(3, float("inf"))), "NaN or infinite"),
    "a 1-D weight": (edit_weights(lambda t: t.__setitem__(first_a(t), t[first_a(t)].flatten())), "2-D floating"),
    "an integer weight": (
        edit_weights(lambda t: t.__setitem__(first_a(t), t[first_a(t)].to(torch.int32))),
        "2-D floating",
    ),
    "loraserve.json not JSON": (lambda f: (f / "loraserve.json").write_text("{"), "loraserve.json is not JSON"),
    "config nested past the parser": (
        lambda f: (f / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000),
        "adapter_config.json is not JSON",
    ),
    "rank-0 matrices": (
        edit_weights(lambda t: [t.__setitem__(k, t[k][:0] if "lora_A" in k else t[k][:, :0]) for k in list(t)]),
        "does not fit the model",
    ),
    "loraserve.json a list": (
        lambda f: (f / "loraserve.json").write_text('["chat-template"]'),
        "unknown prompt format",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_broken_adapter_is_a_config_error_naming_the_problem(
    case: str, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(adapter_dirs["alpha"], folder)
    damage, message = CASES[case]
    damage(folder)
    with pytest.raises(ConfigError, match=message):
        read_adapter(AdapterSpec("broken", str(folder)), PROJECTIONS, num_layers=2)


def test_a_rank_beyond_the_projection_is_refused(tmp_path: Path) -> None:
    """Rank 65 on a 64->32 projection: no more expressive than full rank, and it would size every bank by it."""
    folder = tmp_path / "wide"
    folder.mkdir()
    config = {"peft_type": "LORA", "r": 65, "lora_alpha": 16, "target_modules": ["v_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.model.layers.0.self_attn.v_proj"
    save_file(
        {f"{prefix}.lora_A.weight": torch.zeros(65, 64), f"{prefix}.lora_B.weight": torch.zeros(32, 65)},
        folder / WEIGHTS,
    )
    with pytest.raises(ConfigError, match="does not fit the model"):
        read_adapter(AdapterSpec("wide", str(folder)), PROJECTIONS, num_layers=2)
