"""The native decode-attention kernel (paged_attention.c): built with the machine's C compiler when the server
starts, loaded with ctypes, called by the runner for single-token rows on a CPU.

Why native: the portable decode path gathers every sequence's blocks into a fresh tensor and then runs
scaled_dot_product_attention over it, which reads the keys and values three times; the kernel reads them once,
where they lie. Built at start-up (about a second) rather than shipped, so it is compiled with -march=native for
the CPU it runs on; the library lives only in memory once loaded (its file is removed at once), so nothing stale
can be picked up on another machine. Any failure to build leaves the portable path in place (--decode-attention).
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

SOURCE = "paged_attention.c"
HEAD_DIMS = (16, 32, 64, 128)
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
COMPILE_TIMEOUT_S = 120
# paged_decode_attention's status codes
OK, OUT_OF_MEMORY, UNSUPPORTED_HEAD_DIM = 0, 1, 2


class KernelUnavailable(Exception):
    """The kernel cannot run here; the message says why."""


class PagedDecodeKernel:
    """Calls the compiled kernel on torch tensors. The GIL is released while it runs (ctypes)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        function = library.paged_decode_attention
        function.restype = ctypes.c_int
        function.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6 + [ctypes.c_float, ctypes.c_int]
        self._function = function

    def __call__(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """q: [S, heads, head_dim]; keys, values: one layer's blocks [num_blocks, block_size, kv_heads, head_dim];
        tables: [S, n] block ids (int64); lengths: [S] positions each row attends, at most n * block_size.
        Returns the attention output [S, heads, head_dim]."""
        q = q.contiguous()
        tables, lengths = tables.contiguous(), lengths.contiguous()
        rows, heads, head_dim = q.shape
        _, block_size, kv_heads, _ = keys.shape
        out = torch.empty_like(q)
        status = self._function(
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


def unsupported(shape: CacheShape, device: torch.device) -> str | None:
    """Why the kernel cannot serve this cache, or None when it can."""
    if device.type != "cpu":
        return f"it runs on a CPU, and the model is on {device.type}"
    if shape.dtype != torch.float32:
        return f"it reads a float32 KV cache, and this one is {str(shape.dtype).removeprefix('torch.')}"
    if shape.head_dim not in HEAD_DIMS:
        return f"head_dim {shape.head_dim} is not one of {', '.join(map(str, HEAD_DIMS))}"
    return None


@functools.cache
def build() -> PagedDecodeKernel:
    """The kernel, compiled by $CC (default cc) once per process."""
    return compile_kernel(os.environ.get("CC", "cc"))


def compile_kernel(compiler: str) -> PagedDecodeKernel:
    """Compile the kernel for this CPU and load it. KernelUnavailable says why it could not."""
    if shutil.which(compiler) is None:
        raise KernelUnavailable(f"no C compiler {compiler!r} on PATH (set CC, or install gcc)")
    source = resources.files(__package__).joinpath(SOURCE).read_text()
    with tempfile.TemporaryDirectory(prefix="loraserve-kernel-") as folder:
        source_path, library_path = os.path.join(folder, SOURCE), os.path.join(folder, "paged_attention.so")
        with open(source_path, "w") as file:
            file.write(source)
        try:
            result = subprocess.run(
                [compiler, *COMPILE_FLAGS, "-o", library_path, source_path],
                capture_output=True,
                text=True,
                timeout=COMPILE_TIMEOUT_S,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise KernelUnavailable(f"{compiler} failed to run: {error}") from None
        if result.returncode != 0:
            raise KernelUnavailable(f"{compiler} could not build {SOURCE}: {result.stderr.strip()[-2000:]}")
        # Loaded after torch, so its libgomp.so.1 resolves to the OpenMP runtime torch already runs (one thread pool).
        return PagedDecodeKernel(ctypes.CDLL(library_path))


def select(setting: str, shape: CacheShape, device: torch.device) -> PagedDecodeKernel | None:
    """The kernel for --decode-attention `setting` (auto, native or sdpa): None means the portable path. "native"
    that cannot be had is a ConfigError; "auto" falls back, with a warning where the kernel should have run."""
    if setting == "sdpa":
        return None
    reason = unsupported(shape, device)
    if reason is None:
        try:
            kernel = build()
        except KernelUnavailable as error:
            reason = str(error)
        else:
            logger.info("decode attention", extra={"kernel": "native"})
            return kernel
    if setting == "native":
        raise ConfigError(f"--decode-attention native: {reason}")
    log = logger.warning if device.type == "cpu" else logger.info
    log("decode attention: the native kernel is off, so decode steps gather their blocks", extra={"reason": reason})
    return None
