"""What the benchmarks share: the machine's description, fixed prompts of an exact token length, percentiles, and
random LoRA adapters for a model."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from statistics import quantiles

import torch

CORPUS = (
    "The history of the printing press begins in the fifteenth century, when movable type changed how books were "
    "made and who could read them. Before that, scribes copied every page by hand, which made books rare and costly. "
    "Printers in Mainz, Venice and Paris soon produced thousands of volumes a year, and ideas travelled faster than "
    "ever before. Scientists shared their observations, merchants printed price lists, and governments issued laws "
    "that every town could read on the same day. Literacy spread from the clergy to merchants and craftsmen, and "
    "new genres such as newspapers, pamphlets and novels appeared. Historians still argue about how much the press "
    "caused these changes and how much it only sped up what was already under way, but few doubt that it was one "
    "of the turning points of European history. "
)


def machine() -> dict[str, object]:
    """The hardware and software a figure was measured on."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    info: dict[str, object] = {
        "cpu": cpu,
        "cpu_flags": simd_flags(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def simd_flags() -> str:
    """The CPU's vector-instruction flags (lscpu's, filtered): oneDNN speed differs 2x between AVX and AVX2/512."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return ""
    flags = next(
        (line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), []
    )
    wanted = ("avx", "fma", "f16c", "amx", "sse4")
    return " ".join(sorted(f for f in flags if f.startswith(wanted)))


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 10) -> float:
    """This machine's dense matmul rate now (a large torch.mm on all torch threads): the roof a model can reach."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def prompts(tokenizer, count: int, length: int, start: int = 0) -> list[str]:  # type: ignore[no-untyped-def]
    """`count` different prompt texts of about `length` tokens each (cut at `length` tokens, then decoded), numbered
    from `start`: prompts with different numbers differ from their first tokens on, so they never share a prefix."""
    out = []
    for i in range(start, start + count):
        ids = tokenizer.encode(f"Request {i}. {CORPUS * (1 + length // 100)}", add_special_tokens=False)
        out.append(tokenizer.decode(ids[:length]))
    return out


class FreshPrompts:
    """Prompts never sent before in this run: every measurement takes its own, so none finds another's prompts in the
    server's prefix cache (only the shared-prefix measurement is about that)."""

    def __init__(self, tokenizer, length: int) -> None:  # type: ignore[no-untyped-def]
        self.tokenizer = tokenizer
        self.length = length
        self.used = 0

    def take(self, count: int) -> list[str]:
        texts = prompts(self.tokenizer, count, self.length, start=self.used)
        self.used += count
        return texts


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile (q in 1..99) of values; the value itself for a single sample."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    return quantiles(values, n=100, method="inclusive")[q - 1]


def make_adapters(model_folder: Path, out: Path, count: int, rank: int, targets: list[str]) -> list[Path]:
    """`count` LoRA adapters with random (non-zero) weights for the model in model_folder, saved with PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folders = []
    for i in range(count):
        torch.manual_seed(100 + i)
        model = AutoModelForCausalLM.from_pretrained(model_folder)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
        folder = out / f"adapter-{i}"
        get_peft_model(model, config).save_pretrained(folder)
        folders.append(folder)
    return folders
