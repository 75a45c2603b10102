/* The element-wise steps of a decoder layer, one pass each: RMSNorm, rotary position embedding (in place), and the
   gated MLP's activation, SwiGLU's silu(gate) * up or GeGLU's gelu_tanh(gate) * up (Gemma's). In PyTorch each is
   several ops (RMSNorm six), each a pass over memory and a trip through the dispatcher and the thread pool; at a
   decode step's few rows that fixed cost is most of their time, and torch's silu alone took 0.5 ms on a 512-token
   prefill's [512, 1536] activations. Float32, contiguous rows; built for the CPU at start-up by native.py. Work of at
   least PARALLEL_ELEMENTS is split over `threads` OpenMP threads. */

#include <math.h>

#include "kernels.h"
#include "simd.h"

#define PARALLEL_ELEMENTS 65536

/* out[r] = weight * x[r] / sqrt(mean(x[r]^2) + eps): transformers' LlamaRMSNorm (and Mistral's and Qwen2's). */
void rms_norm(const float *x, const float *weight, float *out, int64_t rows, int64_t width, float eps, int threads) {
    const int64_t body = width / LANES * LANES;
#pragma omp parallel for num_threads(threads) if (rows * width >= PARALLEL_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * width;
        float *o = out + r * width;
        vf acc = splat(0.0f);
        for (int64_t i = 0; i < body; i += LANES) {
            const vf v = load(xr + i);
            acc += v * v;
        }
        float sum = hsum(acc);
        for (int64_t i = body; i < width; i++) sum += xr[i] * xr[i];
        const float scale = 1.0f / sqrtf(sum / (float)width + eps);
        for (int64_t i = 0; i < body; i += LANES) store(o + i, load(weight + i) * (load(xr + i) * scale));
        for (int64_t i = body; i < width; i++) o[i] = weight[i] * (xr[i] * scale);
    }
}

/* Rotates `heads` heads of head_dim floats at the start of each of `rows` rows (row_stride floats apart) in place:
   x * cos + rotate_half(x) * sin, with cos and sin [rows, head_dim], as transformers' apply_rotary_pos_emb. */
void rope(float *x, const float *cosines, const float *sines, int64_t rows, int64_t heads, int64_t head_dim,
          int64_t row_stride, int threads) {
    const int64_t half = head_dim / 2;
#pragma omp parallel for num_threads(threads) if (rows * heads * head_dim >= PARALLEL_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cosines + r * head_dim, *s = sines + r * head_dim;
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + r * row_stride + h * head_dim;
            for (int64_t i = 0; i < half; i++) {
                const float a = v[i], b = v[i + half];
                v[i] = a * c[i] - b * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}

enum activation { SILU, GELU_TANH };

/* sqrt(2 / pi) and the cubic's coefficient in gelu_tanh(x) = x / 2 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3))),
   computed as x * sigmoid(2 * sqrt(2 / pi) * (x + 0.044715 x^3)), the same value without 1 + tanh's cancellation for
   negative x: https://arxiv.org/abs/1606.08415 */
#define GELU_SCALE 0.7978845608028654f
#define GELU_CUBIC 0.044715f

/* One row of act(gate) * up: `width` gates, then `width` ups (the gate and up projections run as one matmul).
   Inlined with `activation` a constant; the callers each hold their own parallel loop, since OpenMP outlines the
   loop's body before inlining, which would leave one body testing `activation` at run time. */
static inline __attribute__((always_inline)) void gated_row(const float *restrict gate, float *restrict out,
    int64_t width, const enum activation activation) {
    const int64_t body = width / LANES * LANES;
    const float *up = gate + width;
    for (int64_t i = 0; i < body; i += LANES) {
        const vf g = load(gate + i);
        const vf x = activation == SILU ? g : 2.0f * GELU_SCALE * (g + GELU_CUBIC * g * g * g);
        store(out + i, g * sigmoid(x) * load(up + i));
    }
    for (int64_t i = body; i < width; i++) {
        const float g = gate[i], x = activation == SILU ? g : 2.0f * GELU_SCALE * (g + GELU_CUBIC * g * g * g);
        out[i] = g / (1.0f + expf(-x)) * up[i];
    }
}

/* SwiGLU (LLaMA's, Mistral's, Qwen2's): silu(gate) * up = gate * sigmoid(gate) * up. */
void silu_mul(const float *gate_up, float *out, int64_t rows, int64_t width, int threads) {
#pragma omp parallel for num_threads(threads) if (rows * width >= PARALLEL_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) gated_row(gate_up + r * 2 * width, out + r * width, width, SILU);
}

/* GeGLU (Gemma's): gelu(gate, approximate="tanh") * up. */
void gelu_tanh_mul(const float *gate_up, float *out, int64_t rows, int64_t width, int threads) {
#pragma omp parallel for num_threads(threads) if (rows * width >= PARALLEL_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) gated_row(gate_up + r * 2 * width, out + r * width, width, GELU_TANH);
}
