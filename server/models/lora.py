"""LoRA adapters for the batch: read PEFT adapter folders, and apply any mix of them to one batch in two matmuls.

For each adapted projection, every resident adapter's A and B matrices are stacked side by side (ranks padded to the
largest, scaling folded into B): `lora(x) = ((x @ A_all) * rows) @ B_all`, where `rows` keeps, for each token, only
the block of its own adapter (all zeros for the base model). The shapes do not depend on which adapters a batch
mixes, so one kernel sequence serves every batch (and a captured CUDA graph stays valid), and the cost is that of a
rank of (adapters x r): small next to the projection itself. This is the idea of Punica's SGMV / S-LoRA, done with
dense matmuls because the number of resident adapters is small.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from loraserve.errors import ConfigError
from loraserve.prompting import PROMPT_FORMATS
from loraserve.server.models.adapters import AdapterInfo, AdapterSpec
from loraserve.server.models.preflight import check_adapter_folder

# The projections of a LLaMA-family decoder layer that an adapter may change.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class LoraDelta:
    """One adapted projection: lora_A [r, in], lora_B [out, r], and the scaling alpha / r."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float


@dataclass(frozen=True)
class LoraAdapter:
    """An adapter read from disk: what ModelInfo reports, and its deltas keyed by (layer, projection)."""

    info: AdapterInfo
    deltas: dict[tuple[int, str], LoraDelta] = field(repr=False)


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name's suffix (peft get_pattern_key)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_supported(config: dict, where: str) -> None:
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{where}: a {config.get('peft_type')} adapter; only LoRA adapters are served")
    refusals = {
        "use_dora": "DoRA adapters are not supported",
        "fan_in_fan_out": "fan_in_fan_out adapters (Conv1D models) are not supported",
        "modules_to_save": "adapters with modules_to_save (fully trained extra modules) are not supported",
        "lora_bias": "adapters with LoRA biases are not supported",
    }
    for key, reason in refusals.items():
        if config.get(key):
            raise ConfigError(f"{where}: {reason}")
    if config.get("bias", "none") != "none":
        raise ConfigError(f"{where}: adapters that train biases (bias={config['bias']!r}) are not supported")


def read_adapter(
    spec: AdapterSpec, projections: dict[str, tuple[int, int]], num_layers: int, where: str = ""
) -> LoraAdapter:
    """Read and check a PEFT LoRA folder against the model: projection name -> (in_features, out_features).
    Errors start with `where` (default: the --adapter flag)."""
    folder = Path(spec.path).expanduser()
    where = where or f"--adapter {spec.id}={spec.path}"
    check_adapter_folder(folder, where)
    weights = folder / "adapter_model.safetensors"
    config_bytes = (folder / "adapter_config.json").read_bytes()
    config = json.loads(config_bytes)
    _check_supported(config, where)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    with safe_open(str(weights), framework="pt") as tensors:
        for key in tensors.keys():
            match = _KEY.match(key)
            if match is None:
                raise ConfigError(f"{where}: does not fit the model: unsupported adapter weight {key}")
            layer, projection, which = int(match[1]), match[2], match[3]
            if projection not in projections or layer >= num_layers:
                raise ConfigError(f"{where}: does not fit the model: no layer {layer} {projection}")
            pairs.setdefault((layer, projection), {})[which] = tensors.get_tensor(key)
    if not pairs:
        raise ConfigError(f"{where}: the adapter has no LoRA weights")
    deltas = {}
    for (layer, projection), pair in sorted(pairs.items()):
        deltas[(layer, projection)] = _delta(config, pair, layer, projection, projections[projection], where)
    targets = tuple(sorted({projection for _, projection in deltas}))
    info = AdapterInfo(
        id=spec.id,
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        target_modules=targets,
        source=str(folder),
        prompt_format=_trained_prompt_format(folder, where),
        content_hash=content_hash(config_bytes, weights),
    )
    return LoraAdapter(info=info, deltas=deltas)


def content_hash(config: bytes, weights: Path) -> str:
    """What identifies an adapter's behaviour: its config and weights, hashed (never its id, which a reload reuses)."""
    digest = hashlib.sha256(config)
    with weights.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _trained_prompt_format(folder: Path, where: str) -> str:
    """The prompt format a `loraserve train` adapter was trained with (its loraserve.json), or "" if unknown."""
    settings = folder / "loraserve.json"
    if not settings.is_file():
        return ""
    name = json.loads(settings.read_text()).get("prompt_format", "")
    if name not in PROMPT_FORMATS:
        raise ConfigError(f"{where}: loraserve.json names an unknown prompt format {name!r}")
    return name


def _delta(
    config: dict, pair: dict[str, torch.Tensor], layer: int, projection: str, features: tuple[int, int], where: str
) -> LoraDelta:
    if set(pair) != {"A", "B"}:
        raise ConfigError(f"{where}: layer {layer} {projection} lacks lora_{'B' if 'A' in pair else 'A'}")
    a, b = pair["A"], pair["B"]
    in_features, out_features = features
    if a.shape[1] != in_features or b.shape[0] != out_features or a.shape[0] != b.shape[1]:
        raise ConfigError(
            f"{where}: does not fit the model: layer {layer} {projection} is {in_features}->{out_features}, "
            f"the adapter's matrices are {tuple(a.shape)} and {tuple(b.shape)}"
        )
    block = "mlp" if projection in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    module = f"model.layers.{layer}.{block}.{projection}"
    rank = a.shape[0]
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, float(config["lora_alpha"]))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoraDelta(a=a, b=b, scaling=scaling)


class LoraBank:
    """Every resident adapter's delta for one projection, stacked: A_all [in, n*r], B_all [n*r, out]."""

    def __init__(
        self,
        deltas: list[LoraDelta | None],
        rank: int,
        features: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        in_features, out_features = features
        self.rank = rank
        self.a_all = torch.zeros(in_features, len(deltas) * rank, dtype=dtype)
        self.b_all = torch.zeros(len(deltas) * rank, out_features, dtype=dtype)
        for i, delta in enumerate(deltas):
            if delta is None:  # this adapter leaves the projection alone
                continue
            r = delta.a.shape[0]
            self.a_all[:, i * rank : i * rank + r] = delta.a.T.to(dtype)
            self.b_all[i * rank : i * rank + r] = (delta.b.T.float() * delta.scaling).to(dtype)
        self.a_all, self.b_all = self.a_all.to(device), self.b_all.to(device)

    def __call__(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """x: [T, in]; rows: [T, n*r], 1 on each token's adapter block. Returns the update [T, out]."""
        return ((x @ self.a_all) * rows) @ self.b_all


class LoraBanks:
    """The banks of every adapted projection of the model, and the per-token masks that select adapters."""

    def __init__(
        self,
        adapters: list[LoraAdapter],
        features: dict[str, tuple[int, int]],
        num_layers: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.adapters = adapters
        self.index = {a.info.id: i for i, a in enumerate(adapters)}
        self.banks: dict[tuple[int, str], LoraBank] = {}
        keys = sorted({key for a in adapters for key in a.deltas})
        for layer, projection in keys:
            deltas = [a.deltas.get((layer, projection)) for a in adapters]
            rank = max(d.a.shape[0] for d in deltas if d is not None)
            self.banks[(layer, projection)] = LoraBank(deltas, rank, features[projection], dtype, device)
        self.ranks = sorted({bank.rank for bank in self.banks.values()})
        self.dtype = dtype
        self.device = device

    def __bool__(self) -> bool:
        return bool(self.banks)

    def row_masks(self, adapter_per_token: torch.Tensor) -> dict[int, torch.Tensor]:
        """For each bank rank r: [T, n*r] with ones on each token's adapter block. adapter_per_token: [T], -1 = base."""
        masks = {}
        n = len(self.adapters)
        for rank in self.ranks:
            block = torch.arange(n * rank, device=self.device) // rank  # [n*r]: which adapter each column serves
            masks[rank] = (block[None, :] == adapter_per_token[:, None]).to(self.dtype)
        return masks

    def get(self, layer: int, projection: str) -> LoraBank | None:
        return self.banks.get((layer, projection))
