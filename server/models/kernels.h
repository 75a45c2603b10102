/* The functions loraserve's C kernels export: their one declaration. Each .c file includes this, so the compiler
   rejects a definition that differs from its prototype here (and, with -Werror=missing-prototypes, an exported
   function that has none); native.py parses these prototypes into the ctypes signatures and checks every call
   against them, arguments by name.

   native.py reads only this much C, and refuses anything else with the function's name: a prototype per statement,
   returning void or int, every parameter one of const float *, float *, const int64_t *, int64_t, float or int, and
   named (the name a Python caller passes it by: no Python keyword, no leading underscore). A pointer is given a
   float32 or int64 tensor, contiguous, on the CPU.

   The kernels trust the sizes they are given, as the comments below state them: a wrong one reads or writes out of
   bounds. NativeKernels (native.py) checks them before each call. */

#ifndef LORASERVE_KERNELS_H
#define LORASERVE_KERNELS_H

#include <stdint.h>

/* paged_attention.c: decode attention over the paged KV cache, one query per row. q, out: [rows, heads, head_dim];
   keys, values: one layer's blocks [num_blocks, block_size, kv_heads, head_dim]; tables: [rows, table_width] block
   ids, each in [0, num_blocks); lengths: [rows] positions each row holds, in [0, table_width * block_size]; heads a
   multiple of kv_heads. Scores are q . k * scale, then softcap * tanh(score / softcap) where softcap > 0; where
   window > 0 a row attends only its last `window` positions. Returns 0; 1 when scratch memory could not be
   allocated; 2 for a head_dim other than 16, 32, 64, 128 or 256. */
int paged_decode_attention(const float *q, const float *keys, const float *values, const int64_t *tables,
                           const int64_t *lengths, float *out, int64_t rows, int64_t table_width, int64_t heads,
                           int64_t kv_heads, int64_t head_dim, int64_t block_size, float scale, float softcap,
                           int64_t window, int threads);

/* elementwise.c: x, out: [rows, width]; weight: [width]. */
void rms_norm(const float *x, const float *weight, float *out, int64_t rows, int64_t width, float eps, int threads);

/* elementwise.c: x: rows of row_stride floats, the first `heads` heads of each rotated in place (heads * head_dim
   at most row_stride; any even head_dim); cosines, sines: [rows, head_dim]. */
void rope(float *x, const float *cosines, const float *sines, int64_t rows, int64_t heads, int64_t head_dim,
          int64_t row_stride, int threads);

/* elementwise.c: gate_up: [rows, 2 * width], each row's gates then its ups; out: [rows, width] = act(gate) * up. */
void silu_mul(const float *gate_up, float *out, int64_t rows, int64_t width, int threads);
void gelu_tanh_mul(const float *gate_up, float *out, int64_t rows, int64_t width, int threads);

#endif
