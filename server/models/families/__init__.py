"""The model families loraserve serves, by config.model_type, and the one check that refuses everything else by name:
an architecture without a family, or a setting of one that the decoder runner does not implement. Plain data, so the
architecture is checked on config.json before torch is imported, and every setting on the loaded config.

Adding a family: one module here with its Family (see llama.py for the fields, gemma2.py for a family that uses most
of them), its line in FAMILIES, and its logit test in tests/server/models/test_families.py.
"""

from __future__ import annotations

from typing import Any

from loraserve.errors import ConfigError
from loraserve.server.models.families.gemma2 import GEMMA2
from loraserve.server.models.families.llama import LLAMA
from loraserve.server.models.families.mistral import MISTRAL
from loraserve.server.models.families.phi3 import PHI3
from loraserve.server.models.families.qwen2 import QWEN2
from loraserve.server.models.families.qwen3 import QWEN3
from loraserve.server.models.families.spec import Family, refusals

FAMILIES: dict[str, Family] = {f.model_type: f for f in (LLAMA, MISTRAL, QWEN2, QWEN3, PHI3, GEMMA2)}


def family_named(model_type: object, architectures: object = None, where: str = "--model") -> Family:
    """The family of config.model_type whose causal LM config.architectures names (when it names any); ConfigError
    naming the architecture and what is served for anything else."""
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    listed = isinstance(architectures, list) and architectures
    if family is None:
        named = f" ({', '.join(map(str, architectures))})" if listed else ""
        raise ConfigError(
            f"{where}: a {model_type!r:.80} model{named:.200}; loraserve serves {', '.join(sorted(FAMILIES))}"
        )
    # A classifier or reward model of the family (LlamaForSequenceClassification) would load as a causal LM with a
    # random LM head: only the family's causal LM is served.
    if listed and not all(isinstance(a, str) and a.endswith("ForCausalLM") for a in architectures):
        raise ConfigError(
            f"{where}: a {', '.join(map(str, architectures)):.200} checkpoint; loraserve serves causal LMs "
            f"({family.architecture} for {model_type} models)"
        )
    return family


def family_for(config: Any, where: str = "--model") -> Family:
    """The family that serves a transformers config; ConfigError naming the architecture, or every setting the runner
    does not implement."""
    family = family_named(getattr(config, "model_type", None), getattr(config, "architectures", None), where)
    reasons = refusals(family, config)
    if reasons:
        raise ConfigError(
            f"{where}: this {family.model_type} model uses what loraserve does not implement: " + "; ".join(reasons)
        )
    return family


__all__ = ["FAMILIES", "Family", "family_for", "family_named"]
