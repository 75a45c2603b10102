"""How data is checked and an adapter trained: frozen dataclasses whose every key is a YAML key of `--config`, a flag
and a LORASERVE_* environment variable (flag > environment > file > default). Defaults follow the prototype's
design: LoRA r=64, alpha=16, dropout 0.1 on q_proj and v_proj; batch 4 x 4 accumulation, 3 epochs, max length 512,
AdamW at 2e-4."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from loraserve.config import option, require
from loraserve.prompting import PROMPT_FORMATS
from loraserve.trainer.data import Rules
from loraserve.trainer.examples import TOO_LONG_ACTIONS

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGET_PRESETS = {"all-linear": ALL_LINEAR, "attention": ALL_LINEAR[:4]}
# Keys that steer a run without changing what it computes: a resumed run may change them.
RUN_CONTROL_KEYS = ("resume", "dry_run")


@dataclass(frozen=True)
class DataConfig:
    """Which conversations to use and how they become training sequences (`loraserve data validate` and `train`)."""

    data: str = option(
        "",
        "Training conversations: a JSON array or JSONL file (messages, ShareGPT, or "
        "'### Human: / ### Assistant:' text).",
        metavar="FILE",
    )
    model: str = option(
        "default",
        "Base model: 'default' (SmolLM2-135M-Instruct), a Hugging Face folder, or a .gguf file.",
        metavar="SOURCE",
    )
    model_cache: str = option("~/.cache/loraserve/models", "Folder for models converted from GGUF.", metavar="DIR")
    prompt_format: str = option(
        "auto",
        "How conversations become text; the server renders requests to this adapter the same way.",
        choices=PROMPT_FORMATS,
    )
    max_length: int = option(512, "Longest training sequence, in tokens.", metavar="TOKENS")
    too_long: str = option(
        "truncate",
        "What to do with a longer conversation: drop it, truncate it to whole turns, or stop with an error.",
        choices=TOO_LONG_ACTIONS,
    )
    train_on_all_turns: bool = option(False, "Learn the whole dialog, not only the assistant turns.")
    min_turns: int = option(0, "Reject conversations with fewer user+assistant turns (0 = no bound).", metavar="N")
    max_turns: int = option(0, "Reject conversations with more user+assistant turns (0 = no bound).", metavar="N")
    min_chars: int = option(0, "Reject conversations with fewer characters (0 = no bound).", metavar="N")
    max_chars: int = option(0, "Reject conversations with more characters (0 = no bound).", metavar="N")
    max_error_rate: float = option(0.5, "Stop when more than this share of the records is rejected.", metavar="RATE")

    def __post_init__(self) -> None:
        require(self.max_length >= 1, "max_length", f"must be >= 1, got {self.max_length}")
        require(0 <= self.max_error_rate <= 1, "max_error_rate", f"must be in [0, 1], got {self.max_error_rate}")

    @property
    def rules(self) -> Rules:
        return Rules(self.min_turns, self.max_turns, self.min_chars, self.max_chars)


@dataclass(frozen=True)
class TrainConfig(DataConfig):
    """How an adapter is trained."""

    output: str = option(
        "runs/adapter",
        "Run folder: checkpoints, rejected.jsonl, report.md, the loss curve, and the finished adapter in adapter/.",
        metavar="DIR",
    )
    device: str = option("auto", "Where to train; auto picks cuda when present.", choices=("auto", "cpu", "cuda"))
    lora_r: int = option(64, "LoRA rank.", metavar="R")
    lora_alpha: float = option(16.0, "LoRA alpha (the update is scaled by alpha / r).", metavar="ALPHA")
    lora_dropout: float = option(0.1, "Dropout on the LoRA input.", metavar="P")
    target_modules: str = option(
        "q_proj,v_proj",
        "Comma-separated projections to adapt, or a preset: all-linear, attention. A name the model lacks is an error.",
        metavar="NAMES",
    )
    qlora: bool = option(
        False, "QLoRA: the base model in 4-bit NF4 with double quantization (bitsandbytes, CUDA only)."
    )
    gradient_checkpointing: bool = option(
        False, "Recompute activations in the backward pass to save memory (always on with --qlora)."
    )
    epochs: int = option(3, "Passes over the training data.", metavar="N")
    batch_size: int = option(4, "Sequences per forward pass (per process).", metavar="N")
    gradient_accumulation: int = option(4, "Forward passes per optimizer step.", metavar="N")
    learning_rate: float = option(2e-4, "Peak AdamW learning rate.", metavar="LR")
    weight_decay: float = option(0.01, "AdamW weight decay.", metavar="W")
    warmup_ratio: float = option(
        0.03, "Share of the optimizer steps spent warming the learning rate up.", metavar="RATIO"
    )
    lr_scheduler: str = option(
        "cosine", "Learning-rate schedule after warm-up.", choices=("cosine", "linear", "constant")
    )
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 = off).", metavar="NORM")
    seed: int = option(
        42,
        "Seed for the split, the data order, LoRA's initialisation and dropout: the same config "
        "and data give the same adapter.",
        metavar="N",
    )
    eval_fraction: float = option(
        0.1, "Share of the conversations held out for evaluation (at least one).", metavar="FRACTION"
    )
    eval_steps: int = option(
        0, "Evaluate (and checkpoint) every N optimizer steps; 0 = at the end of each epoch.", metavar="N"
    )
    early_stopping_patience: int = option(
        3, "Stop after this many evaluations without a better eval loss (0 = never).", metavar="N"
    )
    sample_max_new_tokens: int = option(48, "Tokens generated for the before/after samples in the report.", metavar="N")
    max_steps: int = option(
        0, "Train for at most this many optimizer steps (0 = all epochs); the schedule ends there.", metavar="N"
    )
    resume: bool = option(False, "Continue the run in --output from its last checkpoint; a changed config is refused.")
    dry_run: bool = option(False, "Print the resolved configuration and stop.")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("lora_r", "epochs", "batch_size", "gradient_accumulation"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(0 <= self.lora_dropout < 1, "lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        require(0 < self.eval_fraction < 1, "eval_fraction", f"must be in (0, 1), got {self.eval_fraction}")
        require(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        require(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        require(bool(self.targets), "target_modules", "must name at least one projection")

    @property
    def targets(self) -> tuple[str, ...]:
        """The projections to adapt, presets expanded."""
        if self.target_modules in TARGET_PRESETS:
            return TARGET_PRESETS[self.target_modules]
        return tuple(name.strip() for name in self.target_modules.split(",") if name.strip())

    def fingerprint(self) -> dict[str, object]:
        """The keys that decide what a run computes (what --resume compares)."""
        return {k: v for k, v in asdict(self).items() if k not in RUN_CONTROL_KEYS}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()
