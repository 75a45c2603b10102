"""The native kernels. Decode attention against attention computed plainly in float64 over each sequence's blocks:
every head width (Gemma 2's 256 among them) and query-group size it specialises, blocks in any order, lengths on and
off block boundaries, one thread and several, Gemma 2's soft cap, sliding window and scale. RMSNorm, RoPE, SwiGLU and
GeGLU against transformers' and torch's own. The C interface declared once: kernels.h is parsed strictly, a
definition that differs from it does not build, a call with the wrong arguments raises before it runs, and so does
one with sizes the C would read or write out of bounds with. And how --kernels chooses them or falls back, with the
reason."""

from __future__ import annotations

import logging
import re
from importlib import resources
from typing import Any, NoReturn

import pytest
import torch

from loraserve.errors import ConfigError
from loraserve.server.models import native
from loraserve.server.models.kv_blocks import CacheShape, PagedKVCache

CPU = torch.device("cpu")


def reference(q, keys, values, tables, lengths, scale=None, softcap=0.0, window=0):  # type: ignore[no-untyped-def]
    """softmax(cap(q k^T * scale)) v per sequence over its last `window` positions (all when 0), in float64, reading
    its blocks in table order; scale 1 / sqrt(d) unless given, cap(s) = softcap * tanh(s / softcap) when softcap > 0."""
    rows, heads, head_dim = q.shape
    kv_heads = keys.shape[2]
    out = torch.empty(rows, heads, head_dim, dtype=torch.float64)
    for row in range(rows):
        length = int(lengths[row])
        first = max(0, length - window) if window else 0
        k = keys[tables[row]].reshape(-1, kv_heads, head_dim)[first:length].double()  # [span, kv_heads, head_dim]
        v = values[tables[row]].reshape(-1, kv_heads, head_dim)[first:length].double()
        group = heads // kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [span, heads, head_dim]
        scores = torch.einsum("hd,phd->hp", q[row].double(), k) * (head_dim**-0.5 if scale is None else scale)
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        out[row] = torch.einsum("hp,phd->hd", scores.softmax(-1), v)
    return out


@pytest.fixture(scope="module")
def kernels() -> native.NativeKernels:
    return native.build()


@pytest.mark.parametrize(
    ("head_dim", "heads", "kv_heads"),
    [
        (16, 4, 2),
        (32, 6, 3),
        (64, 9, 3),
        (64, 7, 1),
        (64, 4, 4),
        (64, 10, 2),
        (128, 6, 2),
        (128, 2, 2),
        (256, 8, 4),  # Gemma-2-2b's
        (256, 3, 1),
    ],
)
@pytest.mark.parametrize("rows", [1, 9])
@pytest.mark.parametrize("block_size", [16, 5])
def test_the_kernel_matches_attention_over_each_sequences_blocks(
    kernels: native.NativeKernels, head_dim: int, heads: int, kv_heads: int, rows: int, block_size: int
) -> None:
    generator = torch.Generator().manual_seed(head_dim * 100 + heads * 10 + rows)
    num_blocks = 80
    keys = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator)
    values = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator)
    width = 7
    order = torch.randperm(num_blocks - 1, generator=generator)[: rows * width] + 1  # any block, in any order
    tables = order.view(rows, width)
    # 1 position, a full block, one past a block, up to the whole table
    choices = torch.tensor([1, block_size, block_size + 1, width * block_size, 2 * block_size - 1, 3])
    lengths = choices[torch.arange(rows) % len(choices)]
    q = torch.randn(rows, heads, head_dim, generator=generator) * 3  # sharper softmax than unit scale
    out = kernels.decode_attention(q, keys, values, tables, lengths)
    torch.testing.assert_close(out.double(), reference(q, keys, values, tables, lengths), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    ("head_dim", "heads", "kv_heads"),
    [(16, 4, 2), (32, 6, 3), (64, 9, 3), (64, 7, 1), (128, 6, 2), (128, 2, 2), (256, 8, 4), (256, 3, 1)],
)
@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize(
    ("softcap", "window", "scale"),
    [
        (2.0, 0, None),  # a cap that bites: most scores are beyond it
        (50.0, 0, 0.0625),  # Gemma 2's cap, with query_pre_attn_scalar ** -0.5 for 256
        (0.0, 1, None),  # the last position only
        (0.0, 7, None),  # shorter than some lengths, longer than others, on no block boundary
        (30.0, 37, 0.2),  # all three
    ],
)
def test_gemma2s_soft_cap_window_and_scale_match_the_reference(
    kernels: native.NativeKernels,
    head_dim: int,
    heads: int,
    kv_heads: int,
    block_size: int,
    softcap: float,
    window: int,
    scale: float | None,
) -> None:
    generator = torch.Generator().manual_seed(head_dim * 100 + heads * 10 + block_size + window)
    rows, width, num_blocks = 9, 9, 90
    keys = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator)
    values = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator)
    tables = (torch.randperm(num_blocks - 1, generator=generator)[: rows * width] + 1).view(rows, width)
    choices = torch.tensor([1, block_size, block_size + 1, width * block_size, 2 * block_size - 1, 3, 40, 41, 6])
    lengths = choices[torch.arange(rows) % len(choices)]
    q = torch.randn(rows, heads, head_dim, generator=generator) * 3
    out = kernels.decode_attention(q, keys, values, tables, lengths, scale=scale, softcap=softcap, window=window)
    expected = reference(q, keys, values, tables, lengths, scale=scale, softcap=softcap, window=window)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


def test_a_window_no_shorter_than_the_rows_changes_nothing(kernels: native.NativeKernels) -> None:
    generator = torch.Generator().manual_seed(11)
    keys, values = torch.randn(2, 20, 16, 2, 64, generator=generator)
    tables = torch.randperm(19, generator=generator)[:12].add(1).view(4, 3)
    lengths, q = torch.tensor([48, 47, 17, 1]), torch.randn(4, 6, 64, generator=generator)
    unbounded = kernels.decode_attention(q, keys, values, tables, lengths)
    assert torch.equal(kernels.decode_attention(q, keys, values, tables, lengths, window=48), unbounded)
    with pytest.raises(ValueError, match=r"must be 0 \(off\) or positive"):
        kernels.decode_attention(q, keys, values, tables, lengths, window=-1)


def test_one_thread_and_two_give_the_same_result(kernels: native.NativeKernels) -> None:
    generator = torch.Generator().manual_seed(7)
    keys, values = torch.randn(2, 40, 16, 3, 64, generator=generator)
    tables = torch.randperm(39, generator=generator)[:36].add(1).view(12, 3)
    lengths = torch.randint(1, 49, (12,), generator=generator)
    q = torch.randn(12, 9, 64, generator=generator)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.decode_attention(q, keys, values, tables, lengths)
        torch.set_num_threads(2)
        two = kernels.decode_attention(q, keys, values, tables, lengths)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # each task is one thread's, whatever the split: bit for bit


def test_the_kernel_reads_the_caches_own_pools(kernels: native.NativeKernels) -> None:
    shape = CacheShape(num_layers=2, kv_heads=2, head_dim=32, dtype=torch.float32)
    cache = PagedKVCache(shape, 10, 4, CPU)
    generator = torch.Generator().manual_seed(3)
    slots = torch.tensor([cache.slot([6, 2], p) for p in range(7)])
    for layer in range(2):
        cache.write(
            layer, slots, torch.randn(7, 2, 32, generator=generator), torch.randn(7, 2, 32, generator=generator)
        )
    tables, lengths = torch.tensor([[6, 2]]), torch.tensor([7])
    q = torch.randn(1, 4, 32, generator=generator)
    for layer in range(2):
        keys, values = cache.gather(layer, tables)  # [1, kv_heads, 8, head_dim]
        expected = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys[:, :, :7], values[:, :, :7], enable_gqa=True
        )[0].transpose(0, 1)
        out = kernels.decode_attention(q, *cache.pools(layer), tables, lengths)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("width", [576, 64, 37])  # SmolLM2's, a multiple of the vector width, and one with a tail
@pytest.mark.parametrize("rows", [1, 300])  # one row, and enough to split over threads
def test_rms_norm_matches_transformers(kernels: native.NativeKernels, width: int, rows: int) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    generator = torch.Generator().manual_seed(width + rows)
    norm = LlamaRMSNorm(width, eps=1e-5)
    norm.weight.data = torch.randn(width, generator=generator)
    x = torch.randn(rows, width, generator=generator) * 4
    with torch.inference_mode():
        torch.testing.assert_close(kernels.rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))


@pytest.mark.parametrize(("heads", "rotated", "head_dim"), [(15, 12, 64), (8, 6, 16), (4, 2, 128), (16, 12, 256)])
@pytest.mark.parametrize("rows", [1, 200])
def test_rope_turns_the_first_heads_in_place_as_transformers_does(
    kernels: native.NativeKernels, heads: int, rotated: int, head_dim: int, rows: int
) -> None:
    from transformers.models.llama.modeling_llama import rotate_half

    generator = torch.Generator().manual_seed(heads * rows)
    x = torch.randn(rows, heads, head_dim, generator=generator)
    angles = torch.rand(rows, head_dim // 2, generator=generator) * 100
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    expected = x.clone()
    part = x[:, :rotated]
    expected[:, :rotated] = part * cos[:, None] + rotate_half(part) * sin[:, None]
    kernels.rope_(x, cos, sin, rotated)
    torch.testing.assert_close(x, expected)
    assert torch.equal(x[:, rotated:], expected[:, rotated:])  # the value heads are left alone


@pytest.mark.parametrize(("rows", "width"), [(40, 1536), (3, 17)])  # parallel; a row shorter than one vector
def test_silu_mul_matches_torch_including_large_and_tiny_gates(
    kernels: native.NativeKernels, rows: int, width: int
) -> None:
    generator = torch.Generator().manual_seed(rows * width)
    gate_up = torch.randn(rows, 2 * width, generator=generator) * 10
    gate_up[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -1e-30])  # no overflow, no NaN at the extremes
    gate, up = gate_up.chunk(2, -1)
    out = kernels.silu_mul(gate_up)
    torch.testing.assert_close(out, torch.nn.functional.silu(gate) * up)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("rows", "width"), [(40, 1536), (3, 17)])  # parallel; a row shorter than one vector
def test_gelu_tanh_mul_matches_torch_including_large_and_tiny_gates(
    kernels: native.NativeKernels, rows: int, width: int
) -> None:
    generator = torch.Generator().manual_seed(rows * width + 1)
    gate_up = torch.randn(rows, 2 * width, generator=generator) * 4
    gate_up[0, :5] = torch.tensor([-200.0, 200.0, 0.0, -1e-30, 1e20])  # no overflow, no NaN at the extremes
    gate, up = gate_up.chunk(2, -1)
    out = kernels.gelu_tanh_mul(gate_up)
    torch.testing.assert_close(out, torch.nn.functional.gelu(gate, approximate="tanh") * up)
    assert torch.isfinite(out).all()


HEADER = resources.files(native.__package__).joinpath(native.INTERFACE).read_text()


def test_the_header_parses_into_what_it_declares() -> None:
    prototypes = native.parse_prototypes(HEADER)
    code = " ".join(re.sub(r"/\*.*?\*/", " ", HEADER, flags=re.DOTALL).split())
    assert set(prototypes) == {"paged_decode_attention", "rms_norm", "rope", "silu_mul", "gelu_tanh_mul"}
    for prototype in prototypes.values():
        assert f"{prototype};" in code  # the parse, written back, is the declaration
    assert prototypes["paged_decode_attention"].restype is native.ctypes.c_int
    assert prototypes["silu_mul"].restype is None


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("void scale(double *x, int64_t n);", r"scale: parameter 'double \*x' is not a named"),
        ("void fill(float *, int threads);", r"fill: parameter 'float \*' is not a named"),
        ("void fill(float *x, unsigned int n);", "fill: parameter 'unsigned int n'"),
        ("float norm(const float *x, int64_t n);", "norm returns float, not one of void, int"),
        ("void f(int n); void f(int threads);", "f is declared twice"),
        ("void f(int from, int n);", "f: from is a keyword, private or repeated in Python"),
        ("void f(int n, float n);", "f: n is a keyword, private or repeated"),
        ("void step(float *x, int64_t n)", "'void step.*' does not end with ';'"),
        ("void each(void (*call)(int), int n);", "each: not a prototype"),
        ("typedef float real;", "'typedef float real': not a prototype"),
        ("#if X\nvoid f(int n);\n#endif", "only include guards and #include, not '#if X'"),
    ],
)
def test_a_prototype_the_parser_does_not_read_is_refused_by_name(header: str, message: str) -> None:
    with pytest.raises(native.KernelsUnavailable, match=message):
        native.parse_prototypes(header)


def package_texts() -> dict[str, str]:
    package = resources.files(native.__package__)
    return {name: package.joinpath(name).read_text() for name in native.SOURCES + native.HEADERS}


def edited(name: str, old: str, new: str) -> dict[str, str]:
    texts = package_texts()
    assert old in texts[name]
    texts[name] = texts[name].replace(old, new)
    return texts


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        (  # the definition's threads is an int64_t, the header's an int
            edited(
                "elementwise.c",
                "void silu_mul(const float *gate_up, float *out, int64_t rows, int64_t width, int threads) {",
                "void silu_mul(const float *gate_up, float *out, int64_t rows, int64_t width, int64_t threads) {",
            ),
            "could not build the kernels: .*conflicting types for .silu_mul",
        ),
        (  # a source that does not include the header
            edited("elementwise.c", '#include "kernels.h"\n', ""),
            "could not build the kernels: .*no previous prototype for .*rms_norm",
        ),
        (  # a declaration nothing defines
            edited("kernels.h", "#endif", "void ghost(float *x, int threads);\n#endif"),
            "kernels.h declares ghost, and no source defines it",
        ),
    ],
)
def test_sources_that_disagree_with_the_header_do_not_load(texts: dict[str, str], message: str) -> None:
    with pytest.raises(native.KernelsUnavailable, match=message):
        native.compile_sources("cc", texts)


def test_a_call_with_a_wrong_argument_raises_before_it_runs(kernels: native.NativeKernels) -> None:
    silu_mul = kernels.functions["silu_mul"]
    gate_up, out = torch.ones(2, 8), torch.zeros(2, 4)
    arguments = {"gate_up": gate_up, "out": out, "rows": 2, "width": 4, "threads": 1}
    with pytest.raises(TypeError, match="takes at least 5 arguments"):  # ctypes itself, given the header's argtypes
        silu_mul.c_function(gate_up.data_ptr(), out.data_ptr(), 2, 4)
    wrong = [
        ({**arguments, "threads": None}, "silu_mul: threads: argument 5"),
        ({k: v for k, v in arguments.items() if k != "threads"}, "missing 1 required keyword-only argument: 'threads'"),
        ({**arguments, "extra": 1}, "unexpected keyword argument 'extra'"),  # ctypes would pass it on
        ({**arguments, "rows": 2.0}, "silu_mul: rows: argument 3"),
        (
            {**arguments, "out": torch.zeros(2, 4, dtype=torch.float64)},
            r"out \(float \*\) must be a contiguous torch.float32 tensor on the CPU, not a contiguous torch.float64",
        ),
        ({**arguments, "out": torch.zeros(4, 2).t()}, "not a strided torch.float32"),
        ({**arguments, "gate_up": gate_up.data_ptr()}, r"gate_up \(const float \*\) must be .*, not int"),
    ]
    for call, message in wrong:
        with pytest.raises(TypeError, match=message):
            silu_mul(**call)
    assert torch.equal(out, torch.zeros(2, 4))  # nothing ran
    silu_mul(**arguments)
    torch.testing.assert_close(out, torch.nn.functional.silu(torch.ones(2, 4)))
    x = torch.randn(3, 4, 32)[:, :2]  # rope_ works in place: it cannot copy a strided x
    with pytest.raises(TypeError, match=r"rope: x \(float \*\) must be a contiguous"):
        kernels.rope_(x, torch.ones(3, 32), torch.zeros(3, 32), 2)
    with pytest.raises(TypeError, match=r"rope: cosines \(const float \*\) must be a contiguous"):
        kernels.rope_(x.contiguous(), torch.ones(32, 3).t(), torch.zeros(3, 32), 2)


def decode_arguments(**changes: Any) -> dict[str, Any]:
    """decode_attention's arguments: 3 rows of 4 heads of 16 over 6 blocks of 4 positions, 2 kv heads; `changes`
    replace some."""
    generator = torch.Generator().manual_seed(5)
    keys, values = torch.randn(2, 6, 4, 2, 16, generator=generator)
    tables, lengths = torch.tensor([[1, 2], [3, 4], [5, 0]]), torch.tensor([5, 8, 1])
    q = torch.randn(3, 4, 16, generator=generator)
    return {"q": q, "keys": keys, "values": values, "tables": tables, "lengths": lengths, **changes}


def rope_arguments(**changes: Any) -> dict[str, Any]:
    """rope_'s: the first 3 of 4 heads of 16 in 2 rows."""
    return {"x": torch.randn(2, 4, 16), "cos": torch.randn(2, 16), "sin": torch.randn(2, 16), "heads": 3, **changes}


def rms_norm_arguments(**changes: Any) -> dict[str, Any]:
    return {"x": torch.randn(3, 8), "weight": torch.randn(8), "eps": 1e-6, **changes}


# a NativeKernels method, its arguments with a wrong size, and what the ValueError says
WRONG_SIZES = [
    ("decode_attention", decode_arguments(q=torch.randn(3, 3, 16)), "q's 3 heads must be a positive multiple of kv_h"),
    ("decode_attention", decode_arguments(q=torch.randn(3, 64)), r"q must be \[rows, heads, head_dim\], not \[3, 64\]"),
    ("decode_attention", decode_arguments(values=torch.randn(6, 4, 2, 8)), r"values \[6, 4, 2, 8\] must both be"),
    ("decode_attention", decode_arguments(values=torch.randn(7, 4, 2, 16)), r"values \[7, 4, 2, 16\] must both be"),
    ("decode_attention", decode_arguments(keys=torch.randn(6, 4, 32)), r"keys must be \[num_blocks, block_size, kv_"),
    (  # keys and values alike, with another head_dim than q's
        "decode_attention",
        decode_arguments(keys=torch.randn(6, 4, 2, 32), values=torch.randn(6, 4, 2, 32)),
        "with q's head_dim 16",
    ),
    (
        "decode_attention",
        decode_arguments(
            keys=torch.randn(6, 0, 2, 16), values=torch.randn(6, 0, 2, 16), lengths=torch.zeros(3, dtype=torch.int64)
        ),
        "a block_size of at least 1",
    ),
    (
        "decode_attention",
        decode_arguments(q=torch.randn(3, 4, 80), keys=torch.randn(6, 4, 2, 80), values=torch.randn(6, 4, 2, 80)),
        r"head_dim 80 is not one of \(16, 32, 64, 128, 256\)",
    ),
    ("decode_attention", decode_arguments(tables=torch.tensor([[1, 2], [3, 4]])), "must have q's 3 rows"),
    ("decode_attention", decode_arguments(tables=torch.tensor([1, 2, 3])), r"tables must be \[rows, table_width\]"),
    ("decode_attention", decode_arguments(lengths=torch.tensor([5, 8])), r"lengths \[2\] must have q's 3 rows"),
    ("decode_attention", decode_arguments(lengths=torch.tensor([5, 9, 1])), r"lengths from 1 to 9, outside \[0, 8\]"),
    ("decode_attention", decode_arguments(lengths=torch.tensor([5, -1, 1])), r"lengths from -1 to 5, outside"),
    (
        "decode_attention",
        decode_arguments(tables=torch.tensor([[1, 2], [3, 4], [6, 0]])),
        r"block ids from 0 to 6, outside \[0, 6\)",
    ),
    ("decode_attention", decode_arguments(tables=torch.tensor([[1, 2], [-1, 4], [5, 0]])), "block ids from -1 to 5"),
    ("rms_norm", rms_norm_arguments(weight=torch.randn(7)), r"weight \[7\] must hold x's width, 8 floats"),
    ("rms_norm", rms_norm_arguments(weight=torch.randn(9)), r"weight \[9\] must hold x's width"),
    ("rms_norm", rms_norm_arguments(x=torch.randn(2, 3, 8)), r"x must be \[rows, width\], not \[2, 3, 8\]"),
    ("rope_", rope_arguments(cos=torch.randn(2, 8)), r"cos \[2, 8\] and sin \[2, 16\] must be \[rows, head_dim\]"),
    ("rope_", rope_arguments(sin=torch.randn(1, 16)), r"sin \[1, 16\] must be \[rows, head_dim\], \[2, 16\]"),
    ("rope_", rope_arguments(cos=torch.randn(3, 16), sin=torch.randn(3, 16)), r"cos \[3, 16\] and sin \[3, 16\]"),
    ("rope_", rope_arguments(heads=5), "5 heads to rotate, and x has 4"),
    ("rope_", rope_arguments(heads=-1), "-1 heads to rotate"),
    (
        "rope_",
        rope_arguments(x=torch.randn(2, 4, 15), cos=torch.randn(2, 15), sin=torch.randn(2, 15)),
        "head_dim 15 must be even",
    ),
    ("rope_", rope_arguments(x=torch.randn(2, 64)), r"x must be \[rows, heads, head_dim\]"),
    ("silu_mul", {"gate_up": torch.randn(3, 9)}, "silu_mul: gate_up's rows hold 9 floats, not as many ups as gates"),
    ("silu_mul", {"gate_up": torch.randn(18)}, r"silu_mul: gate_up must be \[rows, 2 \* width\]"),
    ("gelu_tanh_mul", {"gate_up": torch.randn(3, 9)}, "gelu_tanh_mul: gate_up's rows hold 9 floats"),
]
KERNEL = {"decode_attention": "paged_decode_attention", "rope_": "rope"}  # the rest share their C function's name


def did_run(**arguments: object) -> NoReturn:
    raise AssertionError("the kernel ran")


@pytest.mark.parametrize(("method", "arguments", "message"), WRONG_SIZES)
def test_a_size_the_kernel_would_overrun_raises_before_it_runs(
    kernels: native.NativeKernels, method: str, arguments: dict[str, Any], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(kernels.functions, KERNEL.get(method, method), did_run)
    before = {name: value.clone() for name, value in arguments.items() if isinstance(value, torch.Tensor)}
    with pytest.raises(ValueError, match=message):
        getattr(kernels, method)(**arguments)
    assert all(torch.equal(arguments[name], value) for name, value in before.items())  # nothing written


def test_the_right_sizes_pass_the_checks(kernels: native.NativeKernels) -> None:
    arguments = decode_arguments()
    out = kernels.decode_attention(**arguments)
    torch.testing.assert_close(out.double(), reference(**arguments), atol=2e-5, rtol=2e-5)
    arguments = rms_norm_arguments(weight=torch.randn(1, 8))  # any weight holding width floats
    kernels.rms_norm(**arguments)
    kernels.rope_(**rope_arguments(heads=0))
    kernels.rope_(**rope_arguments(heads=4))
    kernels.silu_mul(torch.randn(3, 0))
    empty = decode_arguments(q=torch.randn(0, 4, 16), tables=torch.zeros(0, 2, dtype=torch.int64))
    assert kernels.decode_attention(**{**empty, "lengths": torch.zeros(0, dtype=torch.int64)}).shape == (0, 4, 16)


@pytest.mark.parametrize(
    ("shape", "device", "reason"),
    [
        (CacheShape(2, 2, 80, torch.float32), CPU, "head_dim 80 is not one of 16, 32, 64, 128, 256"),
        (CacheShape(2, 2, 512, torch.float32), CPU, "head_dim 512 is not one of"),
        (CacheShape(2, 2, 64, torch.bfloat16), CPU, "float32 models, and this one is bfloat16"),
        (CacheShape(2, 2, 64, torch.float32), torch.device("cuda"), "run on a CPU, and the model is on cuda"),
    ],
)
def test_caches_the_kernel_cannot_read_fall_back_or_fail_with_the_reason(
    shape: CacheShape, device: torch.device, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert reason in str(native.unsupported(shape, device))
    with caplog.at_level(logging.INFO, logger=native.__name__):
        assert native.select("auto", shape, device) is None
    assert any(reason in str(getattr(record, "reason", "")) for record in caplog.records)
    with pytest.raises(ConfigError, match=f"--kernels native: .*{reason}"):
        native.select("native", shape, device)


def test_torch_never_builds_and_auto_uses_the_kernels_where_they_can() -> None:
    shape = CacheShape(2, 2, 64, torch.float32)
    assert native.select("torch", shape, CPU) is None
    assert native.select("auto", shape, CPU) is native.build()  # built once per process
    assert native.select("native", shape, CPU) is native.build()
    gemma2 = CacheShape(26, 4, 256, torch.float32)  # Gemma-2-2b's
    assert native.select("auto", gemma2, CPU) is native.build()


@pytest.mark.parametrize(
    ("compiler", "message"),
    [
        ("no-such-compiler-here", "no C compiler 'no-such-compiler-here' on PATH"),
        ("false", "false could not build the kernels"),
    ],
)
def test_a_compiler_that_is_missing_or_fails_leaves_the_portable_path(
    compiler: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(native.KernelsUnavailable, match=message):
        native.compile_kernels(compiler)
    monkeypatch.setattr(native, "build", lambda: native.compile_kernels(compiler))
    shape = CacheShape(2, 2, 64, torch.float32)
    assert native.select("auto", shape, CPU) is None
    with pytest.raises(ConfigError, match=f"--kernels native: {message}"):
        native.select("native", shape, CPU)
