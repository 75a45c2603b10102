"""Reading a PEFT LoRA folder into an adapter the runner can apply: its config checked (PEFT's rank and alpha
patterns included, with their regexes bounded in patterns.py), each weight checked against the model's projections
(2-D, finite, of the projection's shape, an update that cannot overflow), and its content hashed."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from loraserve.errors import ConfigError
from loraserve.prompting import PROMPT_FORMATS
from loraserve.server.models.adapters.patterns import finite, pattern_value, read_patterns
from loraserve.server.models.adapters.spec import AdapterInfo, AdapterSpec
from loraserve.server.models.preflight import check_adapter_folder

_KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
# The block of a decoder layer that holds each projection, in every family's checkpoint names: what PEFT's module
# names (and so alpha_pattern keys) say, and where an adapter's weights must be.
MLP_PROJECTIONS = frozenset({"gate_proj", "up_proj", "down_proj", "gate_up_proj"})


def block_of(projection: str) -> str:
    return "mlp" if projection in MLP_PROJECTIONS else "self_attn"


MAX_RANK = 65536  # far above any trained adapter; ranks beyond the projection's size are refused per weight anyway
MAX_UPDATE_REACH = 1e30  # float32 overflows at 3.4e38


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


def _check_supported(config: dict, where: str) -> None:
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{where}: a {config.get('peft_type')} adapter; only LoRA adapters are served")
    refusals = {
        "use_dora": "DoRA adapters are not supported",
        "fan_in_fan_out": "fan_in_fan_out adapters (Conv1D models) are not supported",
        "modules_to_save": "adapters with modules_to_save (fully trained extra modules) are not supported",
        "lora_bias": "adapters with LoRA biases are not supported",
        # activated LoRA: the update applies only after the invocation tokens, which the batch does not track
        "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) adapters are not supported",
        # its layer numbers refer to a stack of replicated base layers, not the model's own
        "layer_replication": "adapters with layer_replication are not supported",
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
    Errors start with `where` (default: the --adapter flag); a file that cannot be read is one of them."""
    where = where or f"--adapter {spec.id}={spec.path}"
    try:
        return _read_adapter(spec, projections, num_layers, where)
    except OSError as error:  # the reason only: the message may reach a client, the path must not
        raise ConfigError(
            f"{where}: cannot read the adapter's files ({error.strerror or type(error).__name__})"
        ) from None


def _read_adapter(
    spec: AdapterSpec, projections: dict[str, tuple[int, int]], num_layers: int, where: str
) -> LoraAdapter:
    folder = Path(spec.path).expanduser()
    check_adapter_folder(folder, where)
    weights = folder / "adapter_model.safetensors"
    config_bytes = (folder / "adapter_config.json").read_bytes()
    config = _read_config(config_bytes, where)
    _check_supported(config, where)
    alpha_patterns = read_patterns(config, "alpha_pattern", where)
    read_patterns(config, "rank_pattern", where)  # unused (the weights' shapes give each rank), but held to PEFT's form
    pairs = _read_weights(weights, projections, num_layers, where)
    if not pairs:
        raise ConfigError(f"{where}: the adapter has no LoRA weights")
    deltas = {}
    for (layer, projection), pair in sorted(pairs.items()):
        delta = _delta(config, alpha_patterns, pair, layer, projection, projections[projection], where)
        deltas[(layer, projection)] = delta
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


def _read_config(config_bytes: bytes, where: str) -> dict[str, Any]:
    """adapter_config.json as an object with `r` in [1, MAX_RANK] and a finite `lora_alpha`; ConfigError else."""
    try:
        config = json.loads(config_bytes)
    except (ValueError, RecursionError) as error:  # not JSON, not UTF-8, or nested past the parser's stack
        raise ConfigError(f"{where}: adapter_config.json is not JSON ({type(error).__name__})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: adapter_config.json must be a JSON object")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise ConfigError(f"{where}: adapter_config.json: r must be an integer in [1, {MAX_RANK}], got {rank!r:.80}")
    if finite(config.get("lora_alpha")) is None:
        raise ConfigError(f"{where}: adapter_config.json: lora_alpha must be a finite number")
    return config


def _read_weights(
    weights: Path, projections: dict[str, tuple[int, int]], num_layers: int, where: str
) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """The A and B matrices by (layer, projection), each 2-D and finite; ConfigError for anything else."""
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights), framework="pt") as tensors:
            for key in tensors.keys():
                match = _KEY.match(key)
                if match is None:
                    raise ConfigError(f"{where}: does not fit the model: unsupported adapter weight {key:.200}")
                layer, block, projection, which = int(match[1]), match[2], match[3], match[4]
                if projection not in projections or block != block_of(projection):
                    raise ConfigError(
                        f"{where}: does not fit the model: it adapts {block}.{projection}, and this model's "
                        f"projections are {', '.join(f'{block_of(p)}.{p}' for p in projections)}"
                    )
                if layer >= num_layers:
                    raise ConfigError(f"{where}: does not fit the model: no layer {layer} (it has {num_layers})")
                tensor = tensors.get_tensor(key)
                if tensor.ndim != 2 or not tensor.is_floating_point():
                    raise ConfigError(f"{where}: {key} must be a 2-D floating-point matrix, got {tuple(tensor.shape)}")
                if not bool(torch.isfinite(tensor).all()):  # NaN or inf would poison every row on this adapter
                    raise ConfigError(f"{where}: {key} holds NaN or infinite values")
                pairs.setdefault((layer, projection), {})[which] = tensor
    except SafetensorError as error:
        raise ConfigError(f"{where}: adapter_model.safetensors is not a valid safetensors file ({error})") from None
    return pairs


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
    try:
        settings_value = json.loads(settings.read_bytes())
    except (ValueError, RecursionError) as error:
        raise ConfigError(f"{where}: loraserve.json is not JSON ({type(error).__name__})") from None
    name = settings_value.get("prompt_format", "") if isinstance(settings_value, dict) else None
    if not isinstance(name, str) or name not in PROMPT_FORMATS:
        raise ConfigError(f"{where}: loraserve.json names an unknown prompt format {name!r:.80}")
    return name


def _delta(
    config: dict,
    alpha_patterns: list[tuple[re.Pattern[str], float]],
    pair: dict[str, torch.Tensor],
    layer: int,
    projection: str,
    features: tuple[int, int],
    where: str,
) -> LoraDelta:
    if set(pair) != {"A", "B"}:
        raise ConfigError(f"{where}: layer {layer} {projection} lacks lora_{'B' if 'A' in pair else 'A'}")
    a, b = pair["A"], pair["B"]
    in_features, out_features = features
    shapes_fit = a.shape[1] == in_features and b.shape[0] == out_features and a.shape[0] == b.shape[1] >= 1
    # A rank above min(in, out) adds nothing a full-rank delta could not, and would only size the banks by it.
    if not shapes_fit or a.shape[0] > min(in_features, out_features):
        raise ConfigError(
            f"{where}: does not fit the model: layer {layer} {projection} is {in_features}->{out_features}, "
            f"the adapter's matrices are {tuple(a.shape)} and {tuple(b.shape)}"
        )
    module = f"model.layers.{layer}.{block_of(projection)}.{projection}"
    rank = a.shape[0]
    alpha = pattern_value(alpha_patterns, module, float(config["lora_alpha"]))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    # The largest value the update x @ A.T @ B.T * scaling can reach per unit of |x|: finite weights whose product
    # still overflows float32 would turn every row on this adapter into NaN. Real adapters stay below 1e6.
    reach = float(a.abs().max()) * float(b.abs().max()) * abs(scaling) * rank * in_features
    if not math.isfinite(reach) or reach > MAX_UPDATE_REACH:
        raise ConfigError(
            f"{where}: layer {layer} {projection}: the weights and scaling (alpha {alpha:g}) are so large that the "
            "update would overflow; this is not a trained adapter"
        )
    return LoraDelta(a=a, b=b, scaling=scaling)
