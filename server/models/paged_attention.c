/* Decode attention over the paged KV cache, reading the blocks where they lie.

   The portable path (gather every sequence's blocks into one tensor, then scaled_dot_product_attention) reads the
   keys and values three times and writes them once; this reads them once. Each task is one sequence: for every
   block, every kv head's query group scores the block's keys, and later every group accumulates the block's values,
   so a block is swept while it is still in cache. Fewer sequences than 2 per thread split by kv head instead.

   Layout (server/models/kv_blocks.py): keys and values of a layer are [num_blocks, block_size, kv_heads, head_dim]
   float32; query heads h * groups .. (h + 1) * groups - 1 share kv head h. Built for the CPU at start-up by
   native.py.

   Gemma 2's two extras cost nothing when off: a sliding window only moves where the sweep starts (from the first
   position in the window, so the blocks before it are never read), and the score soft cap is one more pass over a
   head's scores, skipped when the cap is 0. */

#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "simd.h"

/* scores[g * stride + j] = scale * q_g . k_j for G query heads of width D and a block's first `count` keys. D and G
   are constants where this is inlined, so the queries and sums stay in registers. */
static inline __attribute__((always_inline)) void score_block(const float *restrict q, const float *restrict keys,
    int64_t count, float *restrict scores, int64_t stride, int64_t row_floats, float scale, const int D, const int G) {
    const int C = D / LANES;
    vf qv[G][C];
    for (int g = 0; g < G; g++)
        for (int c = 0; c < C; c++) qv[g][c] = load(q + g * D + c * LANES) * scale;
    for (int64_t j = 0; j < count; j++) {
        vf k[C];
        for (int c = 0; c < C; c++) k[c] = load(keys + j * row_floats + c * LANES);
        for (int g = 0; g < G; g++) {
            vf t = qv[g][0] * k[0];
            for (int c = 1; c < C; c++) t += qv[g][c] * k[c];
            scores[g * stride + j] = hsum(t);
        }
    }
}

/* out_g += sum_j weights[g * stride + j] * v_j for G heads over a block's first `count` values. */
static inline __attribute__((always_inline)) void accumulate_block(float *restrict out, const float *restrict values,
    int64_t count, const float *restrict weights, int64_t stride, int64_t row_floats, const int D, const int G) {
    const int C = D / LANES;
    vf acc[G][C];
    for (int g = 0; g < G; g++)
        for (int c = 0; c < C; c++) acc[g][c] = load(out + g * D + c * LANES);
    for (int64_t j = 0; j < count; j++) {
        vf v[C];
        for (int c = 0; c < C; c++) v[c] = load(values + j * row_floats + c * LANES);
        for (int g = 0; g < G; g++) {
            const float w = weights[g * stride + j];
            for (int c = 0; c < C; c++) acc[g][c] += w * v[c];
        }
    }
    for (int g = 0; g < G; g++)
        for (int c = 0; c < C; c++) store(out + g * D + c * LANES, acc[g][c]);
}

/* Calls call(D, G) with both as constants: head widths 16..256, query groups taken at most MAX_GROUP at a time, so
   a group's queries stay in registers (G * D / LANES vectors: at most 16, half AVX-512's 32 registers). */
#define MAX_GROUP(D) ((D) == 256 ? 1 : (D) == 128 ? 2 : 4)
#define BY_GROUP(call, D, n)                                                                                         \
    switch (n) {                                                                                                     \
    case 1: call(D, 1); break;                                                                                       \
    case 2: call(D, 2); break;                                                                                       \
    case 3: call(D, 3); break;                                                                                       \
    default: call(D, 4);                                                                                             \
    }
#define BY_WIDTH(call, D, n)                                                                                         \
    switch (D) {                                                                                                     \
    case 16: BY_GROUP(call, 16, n) break;                                                                            \
    case 32: BY_GROUP(call, 32, n) break;                                                                            \
    case 64: BY_GROUP(call, 64, n) break;                                                                            \
    case 128:                                                                                                        \
        if (n == 1) call(128, 1);                                                                                    \
        else call(128, 2);                                                                                           \
        break;                                                                                                       \
    default: call(256, 1); /* Gemma 2's */                                                                           \
    }

/* One pass over a sequence's positions [first, length), block by block, for the query heads of kv heads
   [kv_first, kv_last): score the keys into `scores` (pool = keys, accumulate = 0), or add the values weighted by
   `scores` into `out` (pool = values, accumulate = 1); position p's score is column p - first. Inlined with
   `accumulate` a constant. */
static inline __attribute__((always_inline)) void sweep(const float *restrict q, const float *restrict pool,
    const int64_t *restrict table, int64_t first, int64_t length, float *restrict out, float *restrict scores,
    int64_t stride, int64_t kv_first, int64_t kv_last, int64_t groups, int64_t row_floats, int64_t block_size,
    float scale, int D, const int accumulate) {
    const int64_t most = MAX_GROUP(D), first_head = kv_first * groups;
    for (int64_t b = first / block_size; b * block_size < length; b++) {
        const int64_t start = b * block_size > first ? b * block_size : first;
        const int64_t end = (b + 1) * block_size < length ? (b + 1) * block_size : length, count = end - start;
        const float *block = pool + (table[b] * block_size + start - b * block_size) * row_floats;
        for (int64_t kv = kv_first; kv < kv_last; kv++)
            for (int64_t g = 0; g < groups; g += most) {
                const int64_t h = kv * groups + g, n = groups - g < most ? groups - g : most;
                float *s = scores + (h - first_head) * stride + start - first;
#define SCORE(D_, G_) score_block(q + h * D_, block + kv * D_, count, s, stride, row_floats, scale, D_, G_)
#define ACCUMULATE(D_, G_) accumulate_block(out + h * D_, block + kv * D_, count, s, stride, row_floats, D_, G_)
                if (accumulate) {
                    BY_WIDTH(ACCUMULATE, D, n)
                } else {
                    BY_WIDTH(SCORE, D, n)
                }
#undef SCORE
#undef ACCUMULATE
            }
    }
}

/* One sequence: the query heads of kv heads [kv_first, kv_last) attend its positions [first, length). scores holds
   (kv_last - kv_first) * groups rows of `stride` floats. */
static void attend(const float *restrict q, const float *restrict keys, const float *restrict values,
    const int64_t *restrict table, int64_t first, int64_t length, float *restrict out, float *restrict scores,
    int64_t kv_first, int64_t kv_last, int64_t groups, int64_t row_floats, int64_t block_size, float scale,
    float softcap, int D) {
    const int64_t span = length - first, stride = (span + LANES - 1) / LANES * LANES;
    const int64_t first_head = kv_first * groups, heads = (kv_last - kv_first) * groups;
    memset(out + first_head * D, 0, sizeof(float) * heads * D);
    if (span <= 0) return;
    sweep(q, keys, table, first, length, out, scores, stride, kv_first, kv_last, groups, row_floats, block_size, scale,
          D, 0);
    vi lane;
    for (int i = 0; i < LANES; i++) lane[i] = i;
    for (int64_t h = 0; h < heads; h++) {
        /* columns past `span` in the last vector hold stale floats: masked out of the maximum, zero weights */
        float *s = scores + h * stride;
        if (softcap > 0.0f) {
            const float inverse_cap = 1.0f / softcap;
            for (int64_t p = 0; p < stride; p += LANES) store(s + p, softcap * tanh_approx(load(s + p) * inverse_cap));
        }
        vf top = splat(-3.0e38f);
        for (int64_t p = 0; p < stride; p += LANES)
            top = vmax(top, pick(lane + (int32_t)p < (int32_t)span, load(s + p), splat(-3.0e38f)));
        const float m = hmax(top);
        vf total = splat(0.0f);
        for (int64_t p = 0; p < stride; p += LANES) {
            vf e = pick(lane + (int32_t)p < (int32_t)span, exp_nonpositive(load(s + p) - m), splat(0.0f));
            store(s + p, e);
            total += e;
        }
        const vf inverse = splat(1.0f / hsum(total));
        for (int64_t p = 0; p < stride; p += LANES) store(s + p, load(s + p) * inverse);
    }
    sweep(q, values, table, first, length, out, scores, stride, kv_first, kv_last, groups, row_floats, block_size,
          scale, D, 1);
}

/* Declared, with its arguments, in kernels.h. Runs on `threads` OpenMP threads. */
int paged_decode_attention(const float *q, const float *keys, const float *values, const int64_t *tables,
                           const int64_t *lengths, float *out, int64_t rows, int64_t table_width, int64_t heads,
                           int64_t kv_heads, int64_t head_dim, int64_t block_size, float scale, float softcap,
                           int64_t window, int threads) {
    if (head_dim != 16 && head_dim != 32 && head_dim != 64 && head_dim != 128 && head_dim != 256) return 2;
    const int64_t groups = heads / kv_heads, split = rows < 2 * threads ? kv_heads : 1, per_task = kv_heads / split;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *scores = malloc(sizeof(float) * per_task * groups * (table_width * block_size + LANES));
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < rows * split; task++) {
            if (scores == NULL) continue;
            const int64_t row = task / split, part = task % split, length = lengths[row];
            const int64_t first = window > 0 && length > window ? length - window : 0;
            attend(q + row * heads * head_dim, keys, values, tables + row * table_width, first, length,
                   out + row * heads * head_dim, scores, part * per_task, (part + 1) * per_task, groups,
                   kv_heads * head_dim, block_size, scale, softcap, (int)head_dim);
        }
        free(scores);
    }
    return failed;
}
