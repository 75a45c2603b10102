"""loraserve's C kernels for the CPU (paged_attention.c, elementwise.c): built with the machine's C compiler when the
server starts, loaded with ctypes, called by the runner on float32 models.

- Decode attention reads each sequence's KV blocks where they lie. The portable path gathers them into a fresh
  tensor and then runs scaled_dot_product_attention over it, reading the keys and values three times; the kernel
  reads them once. Gemma 2's score soft cap and sliding window are two arguments.
- RMSNorm, rotary embedding and the gated MLP's activation (SwiGLU's silu(gate) * up, GeGLU's gelu_tanh(gate) * up)
  each run as one pass instead of several PyTorch ops.

The C interface is declared once, in kernels.h: every .c file includes it, so the compiler rejects a definition that
differs from its prototype, and this module parses the prototypes into the ctypes signatures, then checks each call
against them by parameter name (a ctypes call with a wrong argument list corrupts memory instead of raising).

Built at start-up (about a second) rather than shipped, so they are compiled with -march=native for the CPU they run
on; the library lives only in memory once loaded (its file is removed at once), so nothing stale can be picked up on
another machine. If they cannot be built or cannot serve the model, the runner uses PyTorch ops (--kernels).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import keyword
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any, NoReturn

import torch

from loraserve.errors import ConfigError
from loraserve.server.models.kv_blocks import CacheShape

logger = logging.getLogger(__name__)

SOURCES = ("paged_attention.c", "elementwise.c")
INTERFACE = "kernels.h"
HEADERS = (INTERFACE, "simd.h")
HEAD_DIMS = (16, 32, 64, 128, 256)  # paged_attention.c specialises these; 256 is Gemma 2's
# missing-prototypes: an exported function must be declared in kernels.h (or its .c file forgot to include it)
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-Werror=missing-prototypes")
COMPILE_TIMEOUT_S = 120
# paged_decode_attention's status codes
OK, OUT_OF_MEMORY = 0, 1

# The C that kernels.h may use, and nothing more: each parameter type's ctypes type and, for a pointer, the dtype of
# the tensor it must be given.
PARAMETER_TYPES: dict[str, tuple[type, torch.dtype | None]] = {
    "const float *": (ctypes.c_void_p, torch.float32),
    "float *": (ctypes.c_void_p, torch.float32),
    "const int64_t *": (ctypes.c_void_p, torch.int64),
    "int64_t": (ctypes.c_int64, None),
    "float": (ctypes.c_float, None),
    "int": (ctypes.c_int, None),
}
RETURN_TYPES: dict[str, type | None] = {"void": None, "int": ctypes.c_int}
_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.DOTALL)
_DIRECTIVE = re.compile(r"#\s*(ifndef|define|endif|include)\b[^\n]*")  # include guards and includes only
_PROTOTYPE = re.compile(r"(\w+)\s+(\w+)\s*\(([^()]*)\)")
_PARAMETER = re.compile(r"((?:const\s+)?\w+)\s*(\*?)\s*(\w+)")


class KernelsUnavailable(Exception):
    """The kernels cannot run here; the message says why."""


@dataclasses.dataclass(frozen=True)
class Parameter:
    name: str
    c_type: str  # as PARAMETER_TYPES spells it
    ctype: type
    dtype: torch.dtype | None  # what a pointer points to; None for a number

    def __str__(self) -> str:
        return f"{self.c_type}{'' if self.c_type.endswith('*') else ' '}{self.name}"


@dataclasses.dataclass(frozen=True)
class Prototype:
    name: str
    restype: type | None
    parameters: tuple[Parameter, ...]

    def __str__(self) -> str:
        return f"{self.name}({', '.join(map(str, self.parameters))})"


def parse_prototypes(text: str, source: str = INTERFACE) -> dict[str, Prototype]:
    """The function prototypes in a header, by name. KernelsUnavailable names the function (or the statement) whose
    declaration is not one this module can turn into ctypes: see kernels.h."""
    code = _COMMENT.sub(" ", text)
    for line in code.splitlines():
        if line.strip().startswith("#") and not _DIRECTIVE.fullmatch(line.strip()):
            raise KernelsUnavailable(f"{source}: only include guards and #include, not {line.strip()!r}")
    code = _DIRECTIVE.sub(" ", code)
    *statements, tail = code.split(";")
    if tail.strip():
        raise KernelsUnavailable(f"{source}: {' '.join(tail.split())!r} does not end with ';'")
    prototypes = {}
    for statement in statements:
        prototype = _parse_prototype(" ".join(statement.split()), source)
        if prototype.name in prototypes:
            raise KernelsUnavailable(f"{source}: {prototype.name} is declared twice")
        prototypes[prototype.name] = prototype
    return prototypes


def _parse_prototype(statement: str, source: str) -> Prototype:
    match = _PROTOTYPE.fullmatch(statement)
    if match is None:
        named = re.search(r"(\w+)\s*\(", statement)
        what = named.group(1) if named else repr(statement)
        raise KernelsUnavailable(f"{source}: {what}: not a prototype this module reads: {statement!r}")
    returns, name, parameters = match.groups()
    if returns not in RETURN_TYPES:
        raise KernelsUnavailable(f"{source}: {name} returns {returns}, not one of {', '.join(RETURN_TYPES)}")
    prototype = Prototype(
        name, RETURN_TYPES[returns], tuple(_parse_parameter(name, p, source) for p in parameters.split(","))
    )
    names = [name] + [parameter.name for parameter in prototype.parameters]
    # each becomes a Python name in caller's generated function
    unusable = [n for n in names if keyword.iskeyword(n) or n.startswith("_") or names.count(n) > 1]
    if unusable:
        raise KernelsUnavailable(f"{source}: {name}: {unusable[0]} is a keyword, private or repeated in Python")
    return prototype


def _parse_parameter(function: str, text: str, source: str) -> Parameter:
    match = _PARAMETER.fullmatch(text.strip())
    c_type = match.group(1) + (" *" if match.group(2) else "") if match else None
    if match is None or c_type not in PARAMETER_TYPES:
        raise KernelsUnavailable(
            f"{source}: {function}: parameter {text.strip()!r} is not a named {', '.join(PARAMETER_TYPES)}"
        )
    return Parameter(match.group(3), c_type, *PARAMETER_TYPES[c_type])


def caller(prototype: Prototype, function: Any) -> Callable[..., Any]:
    """A Python function for the C `function` (ctypes, argtypes and restype set here from the prototype) that takes
    the prototype's parameters as keyword-only arguments, so Python itself refuses a missing, extra or misspelt one,
    and a pointer parameter's as a tensor, refused unless it is contiguous, on the CPU and of the type pointed to.
    Generated, as dataclasses generates __init__, because the call is on the hot path: rms_norm's wrapper took 2.9 us
    so, 2.4 us with no checks, 4.3 us with a loop over the parameters."""
    function.argtypes = [parameter.ctype for parameter in prototype.parameters]
    function.restype = prototype.restype
    names = [parameter.name for parameter in prototype.parameters]
    lines = [f"def {prototype.name}(*, {', '.join(names)}):"]
    for parameter in prototype.parameters:
        if parameter.dtype is not None:
            name, dtype = parameter.name, _global(parameter.dtype)
            lines += [
                f"    if not (_isinstance({name}, _Tensor) and {name}.dtype is {dtype} and {name}.is_cpu and "
                f"{name}.is_contiguous()):",
                f"        _refuse({name!r}, {name})",
            ]
    arguments = [f"{p.name}.data_ptr()" if p.dtype is not None else p.name for p in prototype.parameters]
    lines += [
        "    try:",
        f"        return _function({', '.join(arguments)})",
        "    except _ArgumentError as _error:  # 'argument 7: TypeError: wrong type' from ctypes: name the parameter",
        "        _refuse_number(_error)",
    ]
    namespace = {
        "_isinstance": isinstance,
        "_Tensor": torch.Tensor,
        **{_global(dtype): dtype for _, dtype in PARAMETER_TYPES.values() if dtype is not None},
        "_function": function,
        "_ArgumentError": ctypes.ArgumentError,
        "_refuse": functools.partial(_refuse_pointer, prototype),
        "_refuse_number": functools.partial(_refuse_number, prototype),
    }
    exec("\n".join(lines), namespace)
    generated = namespace[prototype.name]
    generated.c_function = function  # for a test: the bare ctypes call
    return generated


def _global(dtype: torch.dtype) -> str:
    return f"_{str(dtype).removeprefix('torch.')}"  # torch.float32 -> _float32


def _refuse_pointer(prototype: Prototype, name: str, value: object) -> NoReturn:
    parameter = next(p for p in prototype.parameters if p.name == name)
    got = type(value).__name__
    if isinstance(value, torch.Tensor):
        got = f"{'a contiguous' if value.is_contiguous() else 'a strided'} {value.dtype} tensor on {value.device}"
    raise TypeError(
        f"{prototype.name}: {name} ({parameter.c_type}) must be a contiguous {parameter.dtype} tensor on the CPU, "
        f"not {got}"
    )


def _refuse_number(prototype: Prototype, error: ctypes.ArgumentError) -> NoReturn:
    number = re.match(r"argument (\d+)", str(error))
    name = prototype.parameters[int(number.group(1)) - 1].name if number else "an argument"
    raise TypeError(f"{prototype.name}: {name}: {error}") from None


class NativeKernels:
    """The compiled kernels on torch tensors: float32, on the CPU. The GIL is released while one runs (ctypes), and
    each runs on torch's OpenMP threads: the library is loaded after torch, so its libgomp.so.1 is torch's.

    The C trusts the sizes it is given (kernels.h), and the generated callers check only types, so each method checks
    the sizes first and raises ValueError for one the kernel would read or write out of bounds with: a few
    comparisons, and for decode attention a min and max of the block tables and of the lengths (about 5 us)."""

    def __init__(self, library: ctypes.CDLL, prototypes: Mapping[str, Prototype]) -> None:
        self.functions: dict[str, Callable[..., Any]] = {}  # kernels.h's, by name: see caller
        for name, prototype in prototypes.items():
            if not hasattr(library, name):
                raise KernelsUnavailable(f"{INTERFACE} declares {name}, and no source defines it")
            self.functions[name] = caller(prototype, getattr(library, name))
        self._library = library  # the functions live as long as it does

    def decode_attention(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        tables: torch.Tensor,
        lengths: torch.Tensor,
        scale: float | None = None,
        softcap: float = 0.0,
        window: int = 0,
        blocks_checked: bool = False,
    ) -> torch.Tensor:
        """q: [S, heads, head_dim]; keys, values: one layer's blocks [num_blocks, block_size, kv_heads, head_dim];
        tables: [S, n] block ids (int64); lengths: [S] positions each row holds, at most n * block_size.
        Returns the attention output [S, heads, head_dim]. Scores are q . k * scale (head_dim ** -0.5 unless given;
        Gemma 2 gives query_pre_attn_scalar ** -0.5); softcap > 0 turns each into softcap * tanh(score / softcap)
        before the softmax; window > 0 has a row of length L attend only positions [max(0, L - window), L).
        blocks_checked: check_blocks already passed these tables and lengths (every layer of a step reads the same
        ones: the runner checks them once per step, not once per layer)."""
        if softcap < 0 or window < 0:
            raise ValueError(f"decode attention: softcap {softcap} and window {window} must be 0 (off) or positive")
        q, tables, lengths = q.contiguous(), tables.contiguous(), lengths.contiguous()
        _check_decode_attention(q, keys, values, tables, lengths)
        if not blocks_checked:
            self.check_blocks(tables, lengths, keys.shape[0], keys.shape[1])
        rows, heads, head_dim = q.shape
        _, block_size, kv_heads, _ = keys.shape
        out = torch.empty_like(q)
        status = self.functions["paged_decode_attention"](
            q=q,
            keys=keys,
            values=values,
            tables=tables,
            lengths=lengths,
            out=out,
            rows=rows,
            table_width=tables.shape[1],
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            block_size=block_size,
            scale=head_dim**-0.5 if scale is None else scale,
            softcap=softcap,
            window=window,
            threads=torch.get_num_threads(),
        )
        if status == OUT_OF_MEMORY:
            raise MemoryError("paged decode attention: no memory for the attention scores")
        if status != OK:
            raise ValueError(f"paged decode attention: head_dim {head_dim} is not one of {HEAD_DIMS}")
        return out

    @staticmethod
    def check_blocks(tables: torch.Tensor, lengths: torch.Tensor, num_blocks: int, block_size: int) -> None:
        """ValueError unless every block id in tables [S, n] is in [0, num_blocks) and every length in [0, n *
        block_size]: what decode_attention reads through them."""
        table_width = tables.shape[1]
        if tables.numel():  # aminmax refuses an empty tensor
            lowest, highest = (int(end) for end in torch.aminmax(tables))
            if lowest < 0 or highest >= num_blocks:
                raise ValueError(
                    f"decode attention: tables hold block ids from {lowest} to {highest}, outside [0, {num_blocks})"
                )
        if lengths.numel():
            shortest, longest = (int(end) for end in torch.aminmax(lengths))
            if shortest < 0 or longest > table_width * block_size:
                raise ValueError(
                    f"decode attention: lengths from {shortest} to {longest}, outside [0, {table_width * block_size}] "
                    f"(table_width {table_width} * block_size {block_size})"
                )

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """weight * x / sqrt(mean(x^2, -1) + eps) for x [T, width]; weight: [width]."""
        x = x.contiguous()
        rows, width = _dimensions(x, "[rows, width]", "rms_norm: x")
        if weight.numel() != width:
            raise ValueError(f"rms_norm: weight {list(weight.shape)} must hold x's width, {width} floats")
        out = torch.empty_like(x)
        self.functions["rms_norm"](
            x=x, weight=weight, out=out, rows=rows, width=width, eps=eps, threads=torch.get_num_threads()
        )
        return out

    def rope_(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> None:
        """Rotate the first `heads` heads of each row of x [T, any heads, head_dim] (contiguous) in place, with
        cos and sin [T, head_dim] (contiguous)."""
        rows, all_heads, head_dim = _dimensions(x, "[rows, heads, head_dim]", "rope: x")
        if cos.shape != (rows, head_dim) or sin.shape != (rows, head_dim):
            raise ValueError(
                f"rope: cos {list(cos.shape)} and sin {list(sin.shape)} must be [rows, head_dim], {[rows, head_dim]}"
            )
        if not 0 <= heads <= all_heads:
            raise ValueError(f"rope: {heads} heads to rotate, and x has {all_heads}")
        if head_dim % 2:
            raise ValueError(f"rope: head_dim {head_dim} must be even: it rotates the halves of a head")
        self.functions["rope"](
            x=x,
            cosines=cos,
            sines=sin,
            rows=rows,
            heads=heads,
            head_dim=head_dim,
            row_stride=all_heads * head_dim,
            threads=torch.get_num_threads(),
        )

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SwiGLU: silu(gate) * up for gate_up [T, 2 * width] holding each row's gate, then its up: returns
        [T, width]."""
        return self._gated("silu_mul", gate_up)

    def gelu_tanh_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """GeGLU (Gemma's): gelu(gate, approximate="tanh") * up for gate_up [T, 2 * width] holding each row's gate,
        then its up: returns [T, width]."""
        return self._gated("gelu_tanh_mul", gate_up)

    def _gated(self, name: str, gate_up: torch.Tensor) -> torch.Tensor:
        gate_up = gate_up.contiguous()
        rows, both = _dimensions(gate_up, "[rows, 2 * width]", f"{name}: gate_up")
        if both % 2:
            raise ValueError(f"{name}: gate_up's rows hold {both} floats, not as many ups as gates")
        width = both // 2
        out = gate_up.new_empty(rows, width)
        self.functions[name](gate_up=gate_up, out=out, rows=rows, width=width, threads=torch.get_num_threads())
        return out


def _dimensions(tensor: torch.Tensor, layout: str, what: str) -> torch.Size:
    """tensor's shape; ValueError unless it has as many dimensions as `layout` ("[rows, width]") names."""
    if tensor.dim() != layout.count(",") + 1:
        raise ValueError(f"{what} must be {layout}, not {list(tensor.shape)}")
    return tensor.shape


def _check_decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor
) -> None:
    """ValueError unless the shapes, block ids and lengths are as kernels.h states paged_decode_attention's."""
    rows, heads, head_dim = _dimensions(q, "[rows, heads, head_dim]", "decode attention: q")
    layout = "[num_blocks, block_size, kv_heads, head_dim]"
    _, block_size, kv_heads, key_dim = _dimensions(keys, layout, "decode attention: keys")
    if values.shape != keys.shape or key_dim != head_dim or block_size < 1:
        raise ValueError(
            f"decode attention: keys {list(keys.shape)} and values {list(values.shape)} must both be {layout}, "
            f"with q's head_dim {head_dim} and a block_size of at least 1"
        )
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"decode attention: head_dim {head_dim} is not one of {HEAD_DIMS}")
    if kv_heads < 1 or heads < 1 or heads % kv_heads:
        raise ValueError(f"decode attention: q's {heads} heads must be a positive multiple of kv_heads {kv_heads}")
    _dimensions(tables, "[rows, table_width]", "decode attention: tables")
    if tables.shape[0] != rows or lengths.numel() != rows:
        raise ValueError(
            f"decode attention: tables {list(tables.shape)} and lengths {list(lengths.shape)} must have q's {rows} rows"
        )


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
    package = resources.files(__package__)
    return compile_sources(compiler, {name: package.joinpath(name).read_text() for name in SOURCES + HEADERS})


def compile_sources(compiler: str, texts: Mapping[str, str]) -> NativeKernels:
    """Compile SOURCES and HEADERS as `texts` (file name -> C) has them, and load the functions kernels.h declares."""
    prototypes = parse_prototypes(texts[INTERFACE])
    if shutil.which(compiler) is None:
        raise KernelsUnavailable(f"no C compiler {compiler!r} on PATH (set CC, or install gcc)")
    with tempfile.TemporaryDirectory(prefix="loraserve-kernels-") as folder:
        for name in SOURCES + HEADERS:
            with open(os.path.join(folder, name), "w") as file:
                file.write(texts[name])
        library_path = os.path.join(folder, "loraserve_kernels.so")
        command = [compiler, *COMPILE_FLAGS, "-o", library_path, *(os.path.join(folder, s) for s in SOURCES), "-lm"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise KernelsUnavailable(f"{compiler} failed to run: {error}") from None
        if result.returncode != 0:  # the first error is the one to read
            raise KernelsUnavailable(f"{compiler} could not build the kernels: {result.stderr.strip()[:2000]}")
        return NativeKernels(ctypes.CDLL(library_path), prototypes)


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
