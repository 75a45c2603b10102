"""loraserve's C kernels for the CPU (paged_attention.c, elementwise.c): built with the machine's C compiler when the
server starts, loaded with ctypes, called by the runner on float32 models.

- Decode attention reads each sequence's KV blocks where they lie. The portable path gathers them into a fresh
  tensor and then runs scaled_dot_product_attention over it, reading the keys and values three times; the kernel
  reads them once.
- RMSNorm, rotary embedding and SwiGLU's silu(gate) * up each run as one pass instead of several PyTorch ops.

Built at start-up (about a second) rather than shipped, so they are compiled with -march=native for the CPU they run
on; the library lives only in memory once loaded (its file is removed at once), so nothing stale can be picked up on
another machine. If they cannot be built or cannot serve the model, the runner uses PyTorch ops (--kernels).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
import subprocess
import tempfile
from importlib import resources

import torch

from loraserve.errors import ConfigError
from loraserve.server.models.kv_blocks import CacheShape

logger = logging.getLogger(__name__)

SOURCES = ("paged_attention.c", "elementwise.c")
HEADERS = ("simd.h",)
HEAD_DIMS = (16, 32, 64, 128)
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
COMPILE_TIMEOUT_S = 120
# paged_decode_attention's status codes
OK, OUT_OF_MEMORY = 0, 1

_P, _I64, _F32, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
SIGNATURES = {
    "paged_decode_attention": [_P] * 6 + [_I64] * 6 + [_F32, _INT],
    "rms_norm": [_P, _P, _P, _I64, _I64, _F32, _INT],
    "rope": [_P, _P, _P, _I64, _I64, _I64, _I64, _INT],
    "silu_mul": [_P, _P, _I64, _I64, _INT],
}


class KernelsUnavailable(Exception):
    """The kernels cannot run here; the message says why."""


class NativeKernels:
    """The compiled kernels on torch tensors: float32, on the CPU. The GIL is released while one runs (ctypes), and
    each runs on torch's OpenMP threads: the library is loaded after torch, so its libgomp.so.1 is torch's."""

    def __init__(self, library: ctypes.CDLL) -> None:
        for name, argtypes in SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes = argtypes
            function.restype = ctypes.c_int if name == "paged_decode_attention" else None
        self._library = library

    def decode_attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """q: [S, heads, head_dim]; keys, values: one layer's blocks [num_blocks, block_size, kv_heads, head_dim];
        tables: [S, n] block ids (int64); lengths: [S] positions each row attends, at most n * block_size.
        Returns the attention output [S, heads, head_dim]."""
        q, tables, lengths = q.contiguous(), tables.contiguous(), lengths.contiguous()
        rows, heads, head_dim = q.shape
        _, block_size, kv_heads, _ = keys.shape
        out = torch.empty_like(q)
        status = self._library.paged_decode_attention(
            q.data_ptr(),
            keys.data_ptr(),
            values.data_ptr(),
            tables.data_ptr(),
            lengths.data_ptr(),
            out.data_ptr(),
            rows,
            tables.shape[1],
            heads,
            kv_heads,
            head_dim,
            block_size,
            head_dim**-0.5,
            torch.get_num_threads(),
        )
        if status == OUT_OF_MEMORY:
            raise MemoryError("paged decode attention: no memory for the attention scores")
        if status != OK:
            raise ValueError(f"paged decode attention: head_dim {head_dim} is not one of {HEAD_DIMS}")
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """weight * x / sqrt(mean(x^2, -1) + eps) for x [T, width]."""
        x = x.contiguous()
        out = torch.empty_like(x)
        rows, width = x.shape
        self._library.rms_norm(
            x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, width, eps, torch.get_num_threads()
        )
        return out

    def rope_(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> None:
        """Rotate the first `heads` heads of each row of x [T, any heads, head_dim] (contiguous) in place, with
        cos and sin [T, head_dim] (contiguous)."""
        rows, all_heads, head_dim = x.shape
        self._library.rope(
            x.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            rows,
            heads,
            head_dim,
            all_heads * head_dim,
            torch.get_num_threads(),
        )

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for gate_up [T, 2 * width] holding each row's gate, then its up: returns [T, width]."""
        gate_up = gate_up.contiguous()
        rows, width = gate_up.shape[0], gate_up.shape[1] // 2
        out = gate_up.new_empty(rows, width)
        self._library.silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, width, torch.get_num_threads())
        return out


def unsupported(shape: CacheShape, device: torch.device) -> str | None:
    """Why the kernels cannot serve this model, or None when they can."""
    if device.type != "cpu":
        return f"they run on a CPU, and the model is on {device.type}"
    if shape.dtype != torch.float32:
        return f"they run float32 models, and this one is {str(shape.dtype).removeprefix('torch.')}"
    if shape.head_dim not in HEAD_DIMS:
        return f"head_dim {shape.head_dim} is not one of {', '.join(map(str, HEAD_DIMS))}"
    return None


@functools.cache
def build() -> NativeKernels:
    """The kernels, compiled by $CC (default cc) once per process."""
    return compile_kernels(os.environ.get("CC", "cc"))


def compile_kernels(compiler: str) -> NativeKernels:
    """Compile the kernels for this CPU and load them. KernelsUnavailable says why they could not be."""
    if shutil.which(compiler) is None:
        raise KernelsUnavailable(f"no C compiler {compiler!r} on PATH (set CC, or install gcc)")
    package = resources.files(__package__)
    with tempfile.TemporaryDirectory(prefix="loraserve-kernels-") as folder:
        for name in SOURCES + HEADERS:
            with open(os.path.join(folder, name), "w") as file:
                file.write(package.joinpath(name).read_text())
        library_path = os.path.join(folder, "loraserve_kernels.so")
        command = [compiler, *COMPILE_FLAGS, "-o", library_path, *(os.path.join(folder, s) for s in SOURCES), "-lm"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise KernelsUnavailable(f"{compiler} failed to run: {error}") from None
        if result.returncode != 0:
            raise KernelsUnavailable(f"{compiler} could not build the kernels: {result.stderr.strip()[-2000:]}")
        return NativeKernels(ctypes.CDLL(library_path))


def select(setting: str, shape: CacheShape, device: torch.device) -> NativeKernels | None:
    """The kernels for --kernels `setting` (auto, native or torch); None means PyTorch ops. "native" that cannot be
    had is a ConfigError; "auto" falls back, with a warning where the kernels should have run (a CPU)."""
    if setting == "torch":
        return None
    reason = unsupported(shape, device)
    if reason is None:
        try:
            kernels = build()
        except KernelsUnavailable as error:
            reason = str(error)
        else:
            logger.info("kernels", extra={"kernels": "native"})
            return kernels
    if setting == "native":
        raise ConfigError(f"--kernels native: {reason}")
    log = logger.warning if device.type == "cpu" else logger.info
    log("kernels: the native kernels are off; the model runs on PyTorch ops", extra={"reason": reason})
    return None
