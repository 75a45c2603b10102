"""The checks of --model, --adapter and --quantize that need neither torch nor the network. The server runs them
before it binds its ports, so that a mistyped path fails at once rather than after the seconds it takes to import
torch and transformers; the loaders run the same functions on what they load."""

from __future__ import annotations

import json
from pathlib import Path

from loraserve.config import ModelConfig
from loraserve.errors import ConfigError
from loraserve.server.models.adapters.spec import AdapterSpec
from loraserve.server.models.families import family_named


def adapter_specs(config: ModelConfig) -> list[AdapterSpec]:
    """The --adapter NAME=PATH specs, parsed; names must be unique."""
    specs = [AdapterSpec.parse(spec) for spec in config.adapter]
    duplicates = {s.id for s in specs if sum(t.id == s.id for t in specs) > 1}
    if duplicates:
        raise ConfigError(f"--adapter names must be unique; repeated: {', '.join(sorted(duplicates))}")
    return specs


def local_model_path(source: str) -> Path | None:
    """The local GGUF file or Hugging Face folder --model names; None for 'default' and s3:// sources."""
    if source == "default" or source.startswith("s3://"):
        return None
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"--model {source}: no such GGUF file")
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"--model {source}: the folder has no config.json, so it is not a Hugging Face model")
        check_architecture(path / "config.json", f"--model {source}")
        return path
    raise ConfigError(f"--model {source}: not 'default', a model folder, or a .gguf file")


def check_architecture(config_file: Path, where: str) -> None:
    """config.json names a model type loraserve has a family for (its settings are checked once it is loaded)."""
    if not config_file.is_file():
        raise ConfigError(f"{where}: no config.json, so it is not a Hugging Face model")
    try:
        config = json.loads(config_file.read_bytes())
    except (OSError, ValueError, RecursionError) as error:
        raise ConfigError(f"{where}: config.json cannot be read as JSON ({type(error).__name__})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: config.json must be a JSON object")
    family_named(config.get("model_type"), config.get("architectures"), where)


def check_adapter_folder(folder: Path, where: str) -> None:
    """A local PEFT LoRA folder has its config and safetensors weights."""
    if not (folder / "adapter_config.json").is_file():
        raise ConfigError(f"{where}: no adapter_config.json there")
    if not (folder / "adapter_model.safetensors").is_file():
        raise ConfigError(f"{where}: no adapter_model.safetensors there (pickled .bin weights are not loaded)")


def check_quantize(mode: str, device_type: str) -> None:
    """--quantize runs on bitsandbytes, which needs a CUDA device."""
    if mode != "none" and device_type != "cuda":
        raise ConfigError(f"--quantize {mode} needs a CUDA device (bitsandbytes); this server runs on {device_type}")


def check(config: ModelConfig) -> None:
    """Everything about the model configuration that can be checked before torch is imported."""
    local_model_path(config.model)
    for spec in adapter_specs(config):
        if not spec.path.startswith("s3://"):
            check_adapter_folder(Path(spec.path).expanduser(), f"--adapter {spec.id}={spec.path}")
    if config.device == "cpu":
        check_quantize(config.quantize, config.device)
