"""Which runner runs which architecture: a registry from a model's config.model_type to its ModelRunner."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loraserve.errors import ConfigError
from loraserve.server.models.llama import LlamaRunner
from loraserve.server.models.runner import Linear, ModelRunnerClass

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["RUNNERS", "Linear", "runner_class"]

# Mistral and Qwen2 decoder layers are LLaMA's (pre-norm, RoPE, GQA attention, gated MLP); Qwen2's q/k/v biases live
# in the Hugging Face modules the runner calls. Checked logit for logit against transformers in the tests.
RUNNERS: dict[str, ModelRunnerClass] = {"llama": LlamaRunner, "mistral": LlamaRunner, "qwen2": LlamaRunner}


def runner_class(model: PreTrainedModel) -> ModelRunnerClass:
    """The runner for the model's architecture; ConfigError, naming what is supported, for any other."""
    model_type = model.config.model_type
    runner = RUNNERS.get(model_type)
    if runner is None:
        raise ConfigError(
            f"--model: a {model_type!r} model ({type(model).__name__}); loraserve has model runners for "
            f"{', '.join(sorted(RUNNERS))}"
        )
    runner.check_config(model.config)
    return runner
