"""An adapter's alpha_pattern and rank_pattern (PEFT regexes over module names): applied as PEFT applies them, and
refused with a ConfigError naming the key when a pattern is not a regex, not a number, or could backtrack without
bound (LoadAdapter answers INVALID_ARGUMENT for it, never INTERNAL, and never hangs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from loraserve.errors import ConfigError
from loraserve.server.models.adapters.files import read_adapter
from loraserve.server.models.adapters.spec import AdapterSpec

PROJECTIONS = {"q_proj": (64, 64), "v_proj": (64, 32)}  # the tiny model's (conftest.tiny_llama_config)


def with_config(adapter: Path, folder: Path, **changes: Any) -> AdapterSpec:
    shutil.copytree(adapter, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | changes))
    return AdapterSpec("patterned", str(folder))


def test_alpha_pattern_scales_the_modules_it_matches(adapter_dirs: dict[str, Path], tmp_path: Path) -> None:
    patterns = {"q_proj": 32, r"layers\.1\.self_attn\.v_proj": 8.0}
    spec = with_config(adapter_dirs["alpha"], tmp_path / "a", alpha_pattern=patterns, rank_pattern={"q_proj": 4})
    deltas = read_adapter(spec, PROJECTIONS, num_layers=2).deltas  # alpha: rank 4, lora_alpha 16
    assert {key: delta.scaling for key, delta in deltas.items()} == {
        (0, "q_proj"): 8.0,
        (0, "v_proj"): 4.0,
        (1, "q_proj"): 8.0,
        (1, "v_proj"): 2.0,
    }


@pytest.mark.parametrize(
    ("key", "patterns", "message"),
    [
        ("alpha_pattern", {"(": 8}, "not a regular expression"),
        ("alpha_pattern", {"q_proj": "big"}, "must be a number"),
        ("alpha_pattern", {"q_proj": True}, "must be a number"),
        ("alpha_pattern", {"q_proj": float("inf")}, "must be a number"),
        ("alpha_pattern", ["q_proj"], "must be an object"),
        ("alpha_pattern", {"(a+)+$": 8}, "repeats a group"),
        ("alpha_pattern", {"(.|.)" * 14 + "x": 8}, "too many ways"),
        ("alpha_pattern", {".*" * 3 + "x": 8}, "too many ways"),
        ("alpha_pattern", {r"(q)\1": 8}, "backreferences"),
        ("alpha_pattern", {"q" * 257: 8}, "longer than 256"),
        ("alpha_pattern", {f"layers\\.{i}\\.q_proj": 8 for i in range(1025)}, "more than 1024"),
        ("rank_pattern", {"(": 4}, "not a regular expression"),
        ("rank_pattern", {"q_proj": 0}, "must be a positive integer"),
        ("rank_pattern", {"q_proj": 4.5}, "must be a positive integer"),
        ("alpha_pattern", {"q_proj": 10**400}, "must be a number"),
        ("alpha_pattern", {"a{99999999999}": 8}, "not a regular expression"),
        ("alpha_pattern", {"(?i)q_proj": 8}, "not a regular expression"),
    ],
)
def test_bad_patterns_are_refused_naming_the_key(
    key: str, patterns: Any, message: str, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    spec = with_config(adapter_dirs["alpha"], tmp_path / "a", **{key: patterns})
    with pytest.raises(ConfigError, match=rf"{key}.*{message}"):
        read_adapter(spec, PROJECTIONS, num_layers=2)
