"""The base model for training, and the LoRA adapter on it (PEFT). The base is resolved exactly as the server resolves
--model, so an adapter trained on `default` is served on `default`."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraserve.errors import ConfigError
from loraserve.server.models.loading import quantization_config, resolve_device, resolve_model_folder
from loraserve.trainer.config import DataConfig, TrainConfig

logger = logging.getLogger(__name__)


def training_dtype(device: torch.device) -> torch.dtype:
    """float32 on a CPU; bfloat16 on a GPU that has it (float16 would need loss scaling), else float32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_base(config: TrainConfig, device: torch.device) -> tuple[Any, Any, Path, str]:
    """The base model (4-bit for QLoRA), its tokenizer, its local folder, and its name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.qlora and device.type != "cuda":
        raise ConfigError(f"--qlora needs a CUDA device (bitsandbytes 4-bit NF4); this run would train on {device}")
    folder, name = resolve_model_folder(config.model, Path(config.model_cache))
    dtype = training_dtype(device)
    quantization = quantization_config("4bit", device, dtype) if config.qlora else None
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=dtype,
        use_safetensors=True,
        trust_remote_code=False,
        quantization_config=quantization,
        device_map={"": device} if quantization is not None else None,
    )
    if quantization is None:
        model = model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    if config.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()  # so checkpointed blocks see inputs that require grad
    logger.info("base model loaded", extra={"model": name, "folder": str(folder), "dtype": str(dtype)})
    return model, tokenizer, folder, name


def load_tokenizer(config: DataConfig) -> Any:
    """The base model's tokenizer alone (for checking data without loading weights)."""
    from transformers import AutoTokenizer

    folder, _ = resolve_model_folder(config.model, Path(config.model_cache))
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def projection_names(model: nn.Module) -> set[str]:
    """The last name of every linear layer (q_proj, ...), 4-bit ones included."""
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def attach_lora(model: nn.Module, config: TrainConfig) -> Any:
    """A fresh LoRA adapter on the base model, initialised from the run's seed."""
    from peft import LoraConfig, get_peft_model

    available = projection_names(model)
    missing = [name for name in config.targets if name not in available]
    if missing:
        raise ConfigError(
            f"--target-modules: {', '.join(missing)} not in this model; its linear layers are "
            f"{', '.join(sorted(available))}"
        )
    torch.manual_seed(config.seed)  # LoRA's A matrices are drawn here: the seed makes them the same every run
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # PEFT's
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def device_for(config: TrainConfig) -> torch.device:
    return resolve_device(config.device)
