"""Engines on the tiny random Llama, and greedy `generate` as the ground truth they are checked against."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from loraserve.config import EngineConfig, ModelConfig
from loraserve.server.engine.engine import Engine
from loraserve.server.models.loading import LoadedModel, load_model

TINY_KV_CACHE = "64MB"  # plenty for the tiny model; the automatic size would hold 2 GiB per engine


@pytest.fixture(scope="module")
def tiny_loaded(tiny_model_config: ModelConfig) -> LoadedModel:
    return load_model(tiny_model_config)


@pytest.fixture
def make_engine(tiny_loaded: LoadedModel) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(loaded: LoadedModel | None = None, **options: int) -> Engine:
        options.setdefault("kv_cache_memory", TINY_KV_CACHE)
        engine = Engine(loaded or tiny_loaded, dataclasses.replace(EngineConfig(), **options))
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, adapter_dirs: dict[str, Path]) -> Callable[[list[int], int, str], list[int]]:
    """Greedy `model.generate` on separate copies of the model (one per adapter), the ground truth."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def fresh() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()

    models = {"": fresh()} | {
        name: PeftModel.from_pretrained(fresh(), path).eval() for name, path in adapter_dirs.items()
    }

    def generate(prompt_ids: list[int], new_tokens: int, adapter: str = "") -> list[int]:
        ids = torch.tensor([prompt_ids])
        out = models[adapter].generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
        )
        return out[0, len(prompt_ids) :].tolist()

    return generate
