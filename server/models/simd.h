/* What loraserve's C kernels share: 16-float vectors in GCC's vector extensions, which the compiler maps onto whatever
   the CPU has (AVX-512, AVX2, AVX or SSE) under -march=native, and an exponential, a sigmoid and a tanh the compiler
   can vectorise. */

#ifndef LORASERVE_SIMD_H
#define LORASERVE_SIMD_H

#include <stdint.h>

#define LANES 16
typedef float vf __attribute__((vector_size(LANES * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4), aligned(4)));

static inline vf load(const float *p) { return *(const vf *)p; }
static inline void store(float *p, vf v) { *(vf *)p = v; }
static inline vf splat(float x) { return (vf){0} + x; }
static inline vf pick(vi mask, vf yes, vf no) { return (vf)(((vi)yes & mask) | ((vi)no & ~mask)); }
static inline vf vmax(vf a, vf b) { return pick(a > b, a, b); }

static inline float hsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < LANES; i++) s += v[i];
    return s;
}

static inline float hmax(vf v) {
    float m = v[0];
    for (int i = 1; i < LANES; i++) m = v[i] > m ? v[i] : m;
    return m;
}

/* e^x for x <= 0 as 2^n * 2^f, n an integer and f in [-0.5, 0.5], 2^f by Cephes' exp2f polynomial (relative error
   below 2e-7). Below -87 the result is about 1e-38 instead of underflowing. */
static inline vf exp_nonpositive(vf x) {
    vf t = vmax(x, splat(-87.0f)) * 1.44269504088896341f;
    vf n = (t + 12582912.0f) - 12582912.0f; /* round to nearest by adding and removing 1.5 * 2^23 */
    vf f = t - n;
    vf p = splat(1.535336188319500e-4f);
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    return (vf)((vi)p + (__builtin_convertvector(n, vi) << 23));
}

/* 1 / (1 + e^-x), from e^-|x| so the exponential never overflows. */
static inline vf sigmoid(vf x) {
    const vi positive = x > 0.0f;
    const vf e = exp_nonpositive(pick(positive, -x, x));
    return pick(positive, 1.0f / (1.0f + e), e / (1.0f + e));
}

/* tanh as Cephes' tanhf (https://www.netlib.org/cephes/, single/tanhf.c; relative error below 2e-7 here): an odd
   polynomial below |x| = 0.625, where (1 - e) / (1 + e) with e = e^-2|x| would lose digits to cancellation, that
   quotient above. */
static inline vf tanh_approx(vf x) {
    const vi negative = x < 0.0f;
    const vf a = pick(negative, -x, x), z = x * x;
    vf p = splat(-5.70498872745e-3f);
    p = p * z + 2.06390887954e-2f;
    p = p * z - 5.37397155531e-2f;
    p = p * z + 1.33314422036e-1f;
    p = p * z - 3.33332819422e-1f;
    const vf e = exp_nonpositive(-2.0f * a);
    const vf large = (1.0f - e) / (1.0f + e);
    const vf t = pick(a > 0.625f, large, p * z * a + a);
    return pick(negative, -t, t);
}

#endif
