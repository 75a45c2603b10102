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
from re import _constants as sre
from re import _parser as sre_parser
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from loraserve.errors import ConfigError
from loraserve.prompting import PROMPT_FORMATS
from loraserve.server.models.adapters import AdapterInfo, AdapterSpec
from loraserve.server.models.preflight import check_adapter_folder

# The projections of a LLaMA-family decoder layer that an adapter may change.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")

# alpha_pattern / rank_pattern keys are regexes, matched the way PEFT matches them (backtracking `re`) against each
# adapted module's name. Their length does not bound that work ("(.|.)" fourteen times, "(a+)+", ".*.*.*x" are all
# short), so each key is parsed with re's own parser and refused unless it can split a module name in at most
# MAX_PATTERN_WAYS ways: only single characters repeat, and repeats and alternatives multiply up to that bound. The
# names are few and short (model.layers.N.block.projection), so reading an adapter costs at most keys x modules
# bounded matches.
MAX_PATTERN_KEYS = 1024  # tools that write one literal key per module need 7 x the layers
MAX_PATTERN_LENGTH = 256
# One free repeat (65 ways over a 64-character name) fits, two do not: 1,024 keys over an 80-layer model stay under
# a second of matching.
MAX_PATTERN_WAYS = 1_000
MODULE_NAME_LENGTH = 64  # longer than any name matched: model.layers.NNN.self_attn.gate_proj is 37
_SINGLE_CHARACTER = (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN)


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


def _pattern_value(patterns: list[tuple[re.Pattern[str], float]], module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches a module name's suffix."""
    for pattern, value in patterns:
        if pattern.match(module):
            return value
    return default


def read_patterns(config: dict, key: str, where: str) -> list[tuple[re.Pattern[str], float]]:
    """An adapter's alpha_pattern or rank_pattern, checked and compiled as PEFT matches them (peft get_pattern_key);
    a ConfigError naming the key for anything but regular expressions, bounded as above, mapped to numbers."""
    patterns = config.get(key) or {}
    if not isinstance(patterns, dict):
        raise ConfigError(f"{where}: {key} must be an object of regular expression -> number")
    if len(patterns) > MAX_PATTERN_KEYS:
        raise ConfigError(f"{where}: {key} has {len(patterns)} entries, more than {MAX_PATTERN_KEYS}")
    integer = key == "rank_pattern"
    compiled = []
    for pattern, value in patterns.items():
        number = _finite(value)
        if number is None or (integer and not (isinstance(value, int) and value > 0)):
            wanted = "a positive integer" if integer else "a number"
            raise ConfigError(f"{where}: {key}: the value of {pattern[:80]!r} must be {wanted}, got {value!r:.80}")
        problem = _pattern_problem(pattern)
        if problem:
            raise ConfigError(f"{where}: {key}: {pattern[:80]!r} {problem}")
        compiled.append((re.compile(rf"(.*\.)?({pattern})$"), number))
    return compiled


def _finite(value: Any) -> float | None:
    """A JSON number as a finite float; None for anything else (true, "8", Infinity, an integer beyond floats)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _pattern_problem(pattern: str) -> str | None:
    if len(pattern) > MAX_PATTERN_LENGTH:
        return f"is longer than {MAX_PATTERN_LENGTH} characters"
    try:
        _ways(sre_parser.parse(pattern))
        re.compile(rf"(.*\.)?({pattern})$")  # what parses alone may not inside PEFT's wrapping: "(?i)q_proj"
    except (re.error, OverflowError) as error:  # OverflowError: a repeat count beyond re's limit
        return f"is not a regular expression ({error})"
    except ValueError as error:  # _ways' refusals
        return str(error)
    return None


def _ways(items: Any) -> int:
    """At most how many ways a parsed regex can split a module name: what backtracking may try. ValueError for what
    could make that unbounded: a repeated group or alternative, or more ways than MAX_PATTERN_WAYS."""
    ways = 1
    for op, arg in items:
        if op in _SINGLE_CHARACTER or op is sre.AT:
            continue
        if op is sre.SUBPATTERN:
            ways *= _ways(arg[-1])
        elif op is sre.BRANCH:
            ways *= sum(_ways(branch) for branch in arg[1])
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
            low, high, body = arg
            if len(body) != 1 or body[0][0] not in _SINGLE_CHARACTER:
                raise ValueError("repeats a group or an alternative, which can backtrack without bound")
            ways *= max(1, min(high, MODULE_NAME_LENGTH) - low + 1)
        else:
            raise ValueError("uses lookarounds, backreferences, conditionals or atomic groups; PEFT keys need none")
        if ways > MAX_PATTERN_WAYS:
            raise ValueError(f"can match a module name in too many ways (over {MAX_PATTERN_WAYS}): fewer wildcards")
    return ways


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
    if _finite(config.get("lora_alpha")) is None:
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
                layer, projection, which = int(match[1]), match[2], match[3]
                if projection not in projections or layer >= num_layers:
                    raise ConfigError(f"{where}: does not fit the model: no layer {layer} {projection}")
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
    block = "mlp" if projection in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    module = f"model.layers.{layer}.{block}.{projection}"
    rank = a.shape[0]
    alpha = _pattern_value(alpha_patterns, module, float(config["lora_alpha"]))
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
