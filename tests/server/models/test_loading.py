"""Model and adapter loading: sources, the GGUF conversion cache, and refusals that name the option."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from loraserve.config import ModelConfig
from loraserve.errors import ConfigError
from loraserve.server.models import loading
from loraserve.server.models.adapters.spec import AdapterSpec, is_valid_adapter_id
from tests.conftest import HANG_GUARD_S


def test_gguf_is_converted_once_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    conversions: list[Path] = []

    def fake_convert(source: Path, out: Path) -> None:
        conversions.append(source)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(loading, "_convert_gguf", fake_convert)
    first = loading.converted_gguf_folder(gguf, tmp_path / "cache")
    second = loading.converted_gguf_folder(gguf, tmp_path / "cache")
    assert first == second and (first / "config.json").is_file() and conversions == [gguf]
    assert entries(tmp_path / "cache") == [first.name], "no staging folder is left behind"


def test_copies_of_one_gguf_share_a_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keyed by content, not path: every checkout's virtualenv installs its own copy of the default model's file, and
    they all share one conversion (each used to add a 540 MB copy); a file with other content gets its own."""
    copies = [tmp_path / name / "model.gguf" for name in ("venv-a", "venv-b", "other")]
    for path, content in zip(copies, (b"GGUF one", b"GGUF one", b"GGUF two"), strict=True):
        path.parent.mkdir()
        path.write_bytes(content)
    conversions: list[Path] = []

    def fake_convert(source: Path, out: Path) -> None:
        conversions.append(source)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(loading, "_convert_gguf", fake_convert)
    first, second, other = (loading.converted_gguf_folder(path, tmp_path / "cache") for path in copies)
    assert first == second != other and conversions == [copies[0], copies[2]]


def entries(cache: Path) -> list[str]:
    """What the cache holds, apart from the conversion's lock file (which stays, as lock files must)."""
    return [p.name for p in cache.iterdir() if p.suffix != ".lock"]


def test_processes_starting_together_convert_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second conversion that starts while the first runs waits for it and takes its result (flock works between
    threads too: each opens the lock file itself)."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    conversions: list[Path] = []
    second_converts = threading.Event()
    results: list[Path] = []
    second = threading.Thread(target=lambda: results.append(loading.converted_gguf_folder(gguf, tmp_path / "cache")))

    def fake_convert(source: Path, out: Path) -> None:
        conversions.append(out)
        if len(conversions) == 1:  # the first conversion starts the second, which must wait instead of converting
            second.start()
            second_converts.wait(timeout=1.0)
        else:
            second_converts.set()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(loading, "_convert_gguf", fake_convert)
    first = loading.converted_gguf_folder(gguf, tmp_path / "cache")
    second.join(HANG_GUARD_S)
    assert not second.is_alive(), f"hang guard: the second conversion still waits after {HANG_GUARD_S:.0f} s"
    assert len(conversions) == 1 and results == [first] and entries(tmp_path / "cache") == [first.name]


def test_a_failed_conversion_leaves_nothing_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF")

    def failing_convert(source: Path, out: Path) -> None:
        (out / "partial.safetensors").write_text("half")
        raise ValueError("corrupt tensor block")

    monkeypatch.setattr(loading, "_convert_gguf", failing_convert)
    with pytest.raises(ValueError, match="corrupt"):
        loading.converted_gguf_folder(gguf, tmp_path / "cache")
    assert entries(tmp_path / "cache") == []


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("/no/such/model.gguf", "no such GGUF file"),
        ("/no/such/folder", "not 'default', a model folder, or a .gguf file"),
    ],
)
def test_bad_model_sources_are_config_errors(source: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        loading.resolve_model_folder(source, tmp_path)


def test_a_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no config\.json"):
        loading.resolve_model_folder(str(tmp_path), tmp_path)


def test_devices_and_quantization_are_checked_before_loading() -> None:
    import torch

    assert loading.resolve_device("cpu").type == "cpu"
    assert loading.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert loading.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            loading.resolve_device("cuda")
    with pytest.raises(ConfigError, match="--quantize 8bit needs a CUDA device"):
        loading.quantization_config("8bit", torch.device("cpu"), torch.float32)
    assert loading.quantization_config("none", torch.device("cpu"), torch.float32) is None


def test_adapter_specs_and_ids() -> None:
    assert AdapterSpec.parse("support-v2=/models/a=b") == AdapterSpec("support-v2", "/models/a=b")
    for bad in ("nopath", "name="):
        with pytest.raises(ConfigError, match="NAME=PATH"):
            AdapterSpec.parse(bad)
    for bad in ("=path", "../x=/tmp"):
        with pytest.raises(ConfigError, match="the name must be"):
            AdapterSpec.parse(bad)
    for good in ("a", "Support_v2.1", "x" * 64):
        assert is_valid_adapter_id(good)
    for bad in ("", ".hidden", "a/b", "a..b", "x" * 65, "a b", "ä"):
        assert not is_valid_adapter_id(bad)


@pytest.mark.filterwarnings("ignore:Unexpected keyword arguments")  # PEFT, reading the LoRA keys as prefix tuning
def test_adapters_must_be_safetensors_lora_and_unique(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(adapter_dirs["alpha"], pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(ConfigError, match=r"pickled \.bin weights are not loaded"):
        loading.load_model(ModelConfig(model=str(tiny_model_dir), adapter=(f"p={pickled}",)))
    prefix = tmp_path / "prefix"
    shutil.copytree(adapter_dirs["alpha"], prefix)
    config = json.loads((prefix / "adapter_config.json").read_text())
    (prefix / "adapter_config.json").write_text(json.dumps(config | {"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(ConfigError, match="only LoRA adapters are served"):
        loading.load_model(ModelConfig(model=str(tiny_model_dir), adapter=(f"p={prefix}",)))
    twice = (f"a={adapter_dirs['alpha']}", f"a={adapter_dirs['beta']}")
    with pytest.raises(ConfigError, match="repeated: a"):
        loading.load_model(ModelConfig(model=str(tiny_model_dir), adapter=twice))


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": (4, 64)}, "unsupported adapter weight"),
        ({"base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": (4, 64)}, r"no layer 9 \(it has 2\)"),
        ({"base_model.model.model.layers.0.mlp.q_proj.lora_A.weight": (4, 64)}, r"it adapts mlp\.q_proj, and"),
        (
            {
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (4, 128),
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": (128, 4),
            },
            "q_proj is 64->64",
        ),
        ({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (4, 64)}, "lacks lora_B"),
    ],
)
def test_an_adapter_for_another_model_is_refused(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path, tensors: dict, message: str
) -> None:
    import torch
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copy(adapter_dirs["alpha"] / "adapter_config.json", foreign)
    save_file({key: torch.zeros(shape) for key, shape in tensors.items()}, foreign / "adapter_model.safetensors")
    with pytest.raises(ConfigError, match=message):
        loading.load_model(ModelConfig(model=str(tiny_model_dir), adapter=(f"f={foreign}",)))
