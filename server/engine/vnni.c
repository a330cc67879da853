// 4-bit weights times 8-bit activations on AVX-512 VNNI (server/engine/vnni.py builds it).
//
// y (M, N) = x (M, K) @ W^T in float32, W in 4 bits: per group of G input columns and
// output row n, W = sc * q + mn with q in 0..15. Each row of x is quantized to int8 per
// group (its largest magnitude to 127), the products summed in int32 by VPDPBUSD
// (unsigned 4-bit weights times signed 8-bit activations, four at a time), and each
// group's sum scaled into float32:
//   y[m, n] = sum_g dx[m, g] * (sc[n, g] * dot(q[n, g], xq[m, g]) + mn[n, g] * sum(xq[m, g]))
//
// Weight layout, output rows in blocks of 16, each block's K inputs in steps of 8:
//   w  [N/16][K/G][G/8][64] bytes: byte 4i + j of a step holds the weight of row i of the
//      block at input 8s + j (low nibble) and 8s + 4 + j (high nibble), j in 0..3;
//   sc, mn [N/16][K/G][16] float16.
// A 64-byte step is one VPDPBUSD for 16 rows x 4 inputs per nibble half: no horizontal
// sums, and each weight byte is read once for up to 8 rows of activations.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define ROWS_PER_PASS 8

// Each row of x, per group of G inputs, to 8 bits of the group's largest magnitude a:
// x ~ d * (x1 + x2 / 128) with d = a / 127, x1 = round(x / d) and, with `halves` = 2,
// x2 = round((x / d - x1) * 128) in -64..64 (about 15 bits; one half: 8 bits).
// sx = d * sum(x1 + x2 / 128) (the minimums' term).
static void quantize_rows(const float* x, int64_t M, int64_t K, int64_t G, int halves,
                          int8_t* x1, int8_t* x2, float* dx, float* sx) {
    const int64_t groups = K / G;
    const __m512 fine = _mm512_set1_ps(128.0f);
    for (int64_t m = 0; m < M; m++) {
        for (int64_t g = 0; g < groups; g++) {
            const float* p = x + m * K + g * G;
            __m512 peak = _mm512_setzero_ps();
            for (int64_t j = 0; j < G; j += 16)
                peak = _mm512_max_ps(peak, _mm512_abs_ps(_mm512_loadu_ps(p + j)));
            const float a = _mm512_reduce_max_ps(peak);
            const __m512 inv = _mm512_set1_ps(a > 0.0f ? 127.0f / a : 0.0f);
            __m512i sum1 = _mm512_setzero_si512(), sum2 = _mm512_setzero_si512();
            for (int64_t j = 0; j < G; j += 16) {
                const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(p + j), inv);
                // round half to even (the default rounding mode), as torch.round does
                const __m512i r = _mm512_cvtps_epi32(v);
                sum1 = _mm512_add_epi32(sum1, r);
                _mm_storeu_si128((__m128i*)(x1 + m * K + g * G + j), _mm512_cvtsepi32_epi8(r));
                if (halves == 2) {
                    const __m512 rest = _mm512_mul_ps(_mm512_sub_ps(v, _mm512_cvtepi32_ps(r)), fine);
                    const __m512i r2 = _mm512_cvtps_epi32(rest);
                    sum2 = _mm512_add_epi32(sum2, r2);
                    _mm_storeu_si128((__m128i*)(x2 + m * K + g * G + j), _mm512_cvtsepi32_epi8(r2));
                }
            }
            const float d = a / 127.0f;
            dx[m * groups + g] = d;
            sx[m * groups + g] = d * ((float)_mm512_reduce_add_epi32(sum1) +
                                      (float)_mm512_reduce_add_epi32(sum2) / 128.0f);
        }
    }
}

// One block of 16 output columns for ROWS rows of activations (a constant per copy, so
// that the accumulators stay in registers), with one or two halves of the activations.
#define BLOCK(ROWS, HALVES)                                                                   \
    static void block_##ROWS##_##HALVES(const uint8_t* w, const uint16_t* sc,                 \
                                        const uint16_t* mn, const int8_t* x1,                 \
                                        const int8_t* x2, const float* dx, const float* sx,   \
                                        int64_t K, int64_t G, float* y, int64_t N) {          \
        const int64_t groups = K / G, steps = G / 8;                                          \
        const __m512i low = _mm512_set1_epi8(0x0F);                                           \
        const float unit = HALVES == 2 ? 1.0f / 128.0f : 1.0f;                                \
        __m512 acc[ROWS];                                                                     \
        for (int m = 0; m < ROWS; m++) acc[m] = _mm512_setzero_ps();                          \
        for (int64_t g = 0; g < groups; g++) {                                                \
            __m512i dot1[ROWS], dot2[ROWS];                                                   \
            for (int m = 0; m < ROWS; m++) {                                                  \
                dot1[m] = _mm512_setzero_si512();                                             \
                dot2[m] = _mm512_setzero_si512();                                             \
            }                                                                                 \
            const uint8_t* wg = w + g * steps * 64;                                           \
            for (int64_t s = 0; s < steps; s++) {                                             \
                const __m512i v = _mm512_loadu_si512((const void*)(wg + s * 64));             \
                const __m512i lo = _mm512_and_si512(v, low);                                  \
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);            \
                const int64_t at = g * G + s * 8;                                             \
                for (int m = 0; m < ROWS; m++) {                                              \
                    int32_t a0, a1;                                                           \
                    __builtin_memcpy(&a0, x1 + m * K + at, 4);                                \
                    __builtin_memcpy(&a1, x1 + m * K + at + 4, 4);                            \
                    dot1[m] = _mm512_dpbusd_epi32(dot1[m], lo, _mm512_set1_epi32(a0));        \
                    dot1[m] = _mm512_dpbusd_epi32(dot1[m], hi, _mm512_set1_epi32(a1));        \
                    if (HALVES == 2) {                                                        \
                        __builtin_memcpy(&a0, x2 + m * K + at, 4);                            \
                        __builtin_memcpy(&a1, x2 + m * K + at + 4, 4);                        \
                        dot2[m] = _mm512_dpbusd_epi32(dot2[m], lo, _mm512_set1_epi32(a0));    \
                        dot2[m] = _mm512_dpbusd_epi32(dot2[m], hi, _mm512_set1_epi32(a1));    \
                    }                                                                         \
                }                                                                             \
            }                                                                                 \
            const __m512 vs = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sc + g * 16))); \
            const __m512 vm = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(mn + g * 16))); \
            for (int m = 0; m < ROWS; m++) {                                                  \
                __m512i dot = dot1[m];                                                        \
                if (HALVES == 2) dot = _mm512_add_epi32(_mm512_slli_epi32(dot, 7), dot2[m]);  \
                const __m512 scaled = _mm512_mul_ps(vs, _mm512_set1_ps(dx[m * groups + g] * unit)); \
                acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scaled, acc[m]);            \
                acc[m] = _mm512_fmadd_ps(vm, _mm512_set1_ps(sx[m * groups + g]), acc[m]);     \
            }                                                                                 \
        }                                                                                     \
        for (int m = 0; m < ROWS; m++) _mm512_storeu_ps(y + m * N, acc[m]);                   \
    }
#define BLOCKS_OF(HALVES)                                                                     \
    BLOCK(1, HALVES)                                                                          \
    BLOCK(2, HALVES)                                                                          \
    BLOCK(3, HALVES)                                                                          \
    BLOCK(4, HALVES)                                                                          \
    BLOCK(5, HALVES) BLOCK(6, HALVES) BLOCK(7, HALVES) BLOCK(8, HALVES)
BLOCKS_OF(1)
BLOCKS_OF(2)

typedef void (*block_fn)(const uint8_t*, const uint16_t*, const uint16_t*, const int8_t*,
                         const int8_t*, const float*, const float*, int64_t, int64_t, float*,
                         int64_t);
static const block_fn BLOCKS[2][ROWS_PER_PASS + 1] = {
    {0, block_1_1, block_2_1, block_3_1, block_4_1, block_5_1, block_6_1, block_7_1, block_8_1},
    {0, block_1_2, block_2_2, block_3_2, block_4_2, block_5_2, block_6_2, block_7_2, block_8_2},
};

// The calling thread's scratch (the quantized activations), grown as needed and kept.
static __thread uint8_t* scratch;
static __thread int64_t scratch_bytes;

static uint8_t* scratch_of(int64_t bytes) {
    if (bytes > scratch_bytes) {
        free(scratch);
        bytes = (bytes + 4095) / 4096 * 4096;
        scratch = aligned_alloc(64, (size_t)bytes);
        scratch_bytes = scratch ? bytes : 0;
    }
    return scratch;
}

// Returns 0; 1 when the shapes do not fit the layout, 2 when scratch memory ran out
// (nothing is written then). halves: 1 = activations in 8 bits, 2 = in two 8-bit halves
// (about 15 bits; twice the dot products).
int q4_matmul(const float* x, const uint8_t* w, const uint16_t* sc, const uint16_t* mn,
              int64_t M, int64_t N, int64_t K, int64_t G, int halves, float* y, int threads) {
    if (M < 0 || N % 16 || G % 16 || G <= 0 || K % G || (halves != 1 && halves != 2)) return 1;
    if (M == 0) return 0;
    const int64_t groups = K / G, blocks = N / 16, padded = ((M * K + 63) / 64) * 64;
    uint8_t* room = scratch_of(2 * padded + 2 * M * groups * (int64_t)sizeof(float));
    if (!room) return 2;
    int8_t* x1 = (int8_t*)room;
    int8_t* x2 = x1 + padded;
    float* dx = (float*)(x2 + padded);
    float* sx = dx + M * groups;
    quantize_rows(x, M, K, G, halves, x1, x2, dx, sx);
    if (threads < 1 || blocks < 2 * threads) threads = 1;  // too little to share
    // in chunks taken as threads come free: a thread the OS preempts (the HTTP side, a
    // client on the same cores) delays its chunk, not half the layer
    const int64_t chunk = blocks / (8 * threads) > 1 ? blocks / (8 * threads) : 1;
#pragma omp parallel for num_threads(threads) schedule(dynamic, chunk)
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t* wb = w + b * (K / 2) * 16;
        const uint16_t* sb = sc + b * groups * 16;
        const uint16_t* mb = mn + b * groups * 16;
        for (int64_t m0 = 0; m0 < M; m0 += ROWS_PER_PASS) {
            const int64_t rows = M - m0 < ROWS_PER_PASS ? M - m0 : ROWS_PER_PASS;
            BLOCKS[halves - 1][rows](wb, sb, mb, x1 + m0 * K, x2 + m0 * K, dx + m0 * groups,
                                     sx + m0 * groups, K, G, y + m0 * N + b * 16, N);
        }
    }
    return 0;
}

// ---- LoRA deltas, each row with its own adapter, weights in 8 bits ----------------------
//
// For row m of x (M, K), adapter slot s = slot[m / T] (T tokens per sequence row; -1: none):
//   h[r]    = a_scale[r] * sum_k a[r, k] * x[m, k]          for r in off[s] .. off[s + 1]
//   y[m, n] += b_scale[s, n] * sum_r h[r] * b[r, n]
// a (R, K) int8 holds every resident adapter's A, one scale per row (a rank component);
// b (R, N) int8 their B transposed, one scale per output column and adapter. A row reads
// only its own adapter's weights, a quarter of their float32 bytes.

static inline __m512 load_i8_as_ps(const int8_t* p, __mmask16 mask) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}

static inline __mmask16 tail_mask(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}

int lora_add(const float* x, int64_t M, int64_t T, int64_t K, int64_t N, const int32_t* slot,
             int64_t slots, const int32_t* off, const int8_t* a, const float* a_scale,
             const int8_t* b, const float* b_scale, float* y, int threads) {
    if (M < 0 || T < 1 || K < 1 || N < 1 || M % T) return 1;
    if (M == 0) return 0;
    int64_t widest = 0;
    for (int64_t s = 0; s < slots; s++) {
        if (off[s + 1] < off[s]) return 1;
        if (off[s + 1] - off[s] > widest) widest = off[s + 1] - off[s];
    }
    for (int64_t i = 0; i < M / T; i++)
        if (slot[i] >= slots) return 1;
    if (widest == 0) return 0;
    float* h = (float*)scratch_of(M * widest * (int64_t)sizeof(float));
    if (!h) return 2;
    const int64_t col_blocks = (N + 63) / 64;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for collapse(2) schedule(static)
        for (int64_t m = 0; m < M; m++) {
            for (int64_t r = 0; r < widest; r++) {
                const int32_t s = slot[m / T];
                if (s < 0 || r >= off[s + 1] - off[s]) continue;
                const int64_t row = off[s] + r;
                const int8_t* ar = a + row * K;
                const float* xm = x + m * K;
                __m512 acc = _mm512_setzero_ps();
                for (int64_t k = 0; k < K; k += 16) {
                    const __mmask16 mask = tail_mask(K - k);
                    acc = _mm512_fmadd_ps(load_i8_as_ps(ar + k, mask),
                                          _mm512_maskz_loadu_ps(mask, xm + k), acc);
                }
                h[m * widest + r] = _mm512_reduce_add_ps(acc) * a_scale[row];
            }
        }
#pragma omp for collapse(2) schedule(static)
        for (int64_t m = 0; m < M; m++) {
            for (int64_t cb = 0; cb < col_blocks; cb++) {
                const int32_t s = slot[m / T];
                if (s < 0) continue;
                const int64_t rank = off[s + 1] - off[s];
                if (rank == 0) continue;
                const int64_t end = (cb + 1) * 64 < N ? (cb + 1) * 64 : N;
                for (int64_t n = cb * 64; n < end; n += 16) {
                    const __mmask16 mask = tail_mask(end - n);
                    __m512 acc = _mm512_setzero_ps();
                    for (int64_t r = 0; r < rank; r++) {
                        acc = _mm512_fmadd_ps(_mm512_set1_ps(h[m * widest + r]),
                                              load_i8_as_ps(b + (off[s] + r) * N + n, mask), acc);
                    }
                    float* out = y + m * N + n;
                    const __m512 scale = _mm512_maskz_loadu_ps(mask, b_scale + s * N + n);
                    _mm512_mask_storeu_ps(out, mask,
                                          _mm512_fmadd_ps(acc, scale, _mm512_maskz_loadu_ps(mask, out)));
                }
            }
        }
    }
    return 0;
}

// ---- RMS norm, one call for all rows -----------------------------------------------------
//
// y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w, in float32, plus residual[r, :] where
// a residual is given (NULL: none): a decode step runs some hundred of them on a few rows
// each, one call instead of five or six framework operators.
int rms_norm(const float* x, int64_t rows, int64_t dim, const float* w, float eps,
             const float* residual, float* y) {
    if (rows < 0 || dim < 1) return 1;
    for (int64_t r = 0; r < rows; r++) {
        const float* xr = x + r * dim;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t k = 0; k < dim; k += 16) {
            const __m512 v = _mm512_maskz_loadu_ps(tail_mask(dim - k), xr + k);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        const float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)dim + eps);
        const __m512 vinv = _mm512_set1_ps(inv);
        float* yr = y + r * dim;
        for (int64_t k = 0; k < dim; k += 16) {
            const __mmask16 mask = tail_mask(dim - k);
            const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, xr + k), vinv);
            __m512 o = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mask, w + k));
            if (residual) o = _mm512_add_ps(o, _mm512_maskz_loadu_ps(mask, residual + r * dim + k));
            _mm512_mask_storeu_ps(yr + k, mask, o);
        }
    }
    return 0;
}

// ---- The MLP's activation times its up projection ----------------------------------------
//
// y = act(gate) * up elementwise (n values), act 0: GELU with the tanh approximation
// (Gemma), 1: SiLU (Llama). exp in 16 lanes: Cody-Waite reduction and a degree-6
// polynomial (Cephes' expf), within a few float32 ulps.
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

int act_mul(const float* gate, const float* up, int64_t n, int act, float* y) {
    if (n < 0 || (act != 0 && act != 1)) return 1;
    const __m512 one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 mask = tail_mask(n - i);
        const __m512 g = _mm512_maskz_loadu_ps(mask, gate + i);
        __m512 a;
        if (act == 0) {
            // 0.5 g (1 + tanh(u)), u = sqrt(2 / pi) (g + 0.044715 g^3); tanh u = 1 - 2 / (e^2u + 1)
            const __m512 g3 = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
            const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                           _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), g3, g));
            const __m512 e = exp_ps(_mm512_add_ps(u, u));
            const __m512 t = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, one)));
            a = _mm512_mul_ps(_mm512_mul_ps(half, g), _mm512_add_ps(one, t));
        } else {
            a = _mm512_div_ps(g, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        }
        _mm512_mask_storeu_ps(y + i, mask, _mm512_mul_ps(a, _mm512_maskz_loadu_ps(mask, up + i)));
    }
    return 0;
}

// ---- Attention of a decode step (one new token per row), float32 ----------------------
//
// For each row r at position p = pos[r], with q (n, heads * dim), k and v (n, kv_heads * dim)
// from the projections:
// - each head of q and k through its RMS norm (q_norm / k_norm; NULL: none) and the rotary
//   embedding x * cos + roll(x, dim / 2) * sin (cos, sin (n, dim), the sine's first half
//   negated: rotate_half's sign);
// - k and v into the cache at column p: keys, values (rows, kv_heads, capacity, dim);
// - each query head attends over its key head's columns max(0, p - window + 1) .. p
//   (window 0: all), softmax(scale * q.k) in float32, into out (n, heads * dim).
// One call for what takes some forty framework operators per layer.

static inline float dot_ps(const float* a, const float* b, int64_t dim) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d += 16) {
        const __mmask16 mask = tail_mask(dim - d);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, a + d), _mm512_maskz_loadu_ps(mask, b + d), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

// x (dim) -> y: RMS norm with w (NULL: none), then the rotary embedding.
static void norm_rope(const float* x, const float* w, float eps, const float* cos,
                      const float* sin, int64_t dim, float* y) {
    const int64_t half = dim / 2;
    float inv = 1.0f;
    if (w) inv = 1.0f / sqrtf(dot_ps(x, x, dim) / (float)dim + eps);
    for (int64_t d = 0; d < dim; d++) {
        const int64_t e = d < half ? d + half : d - half;
        const float a = w ? x[d] * inv * w[d] : x[d];
        const float b = w ? x[e] * inv * w[e] : x[e];
        y[d] = a * cos[d] + b * sin[d];
    }
}

int attend_decode(const float* q, const float* k, const float* v, int64_t n, int64_t heads,
                  int64_t kv_heads, int64_t dim, const float* q_norm, const float* k_norm,
                  float eps, const float* cos, const float* sin, const int64_t* pos,
                  float* keys, float* values, int64_t rows, int64_t capacity, int64_t window,
                  float scale, float* out, int threads) {
    if (n < 0 || n > rows || heads < 1 || kv_heads < 1 || heads % kv_heads || dim < 2 || dim % 2 ||
        window < 0)
        return 1;
    for (int64_t r = 0; r < n; r++)
        if (pos[r] < 0 || pos[r] >= capacity) return 1;
    const int64_t groups = heads / kv_heads;
    for (int64_t r = 0; r < n; r++) {
        for (int64_t h = 0; h < kv_heads; h++) {
            const int64_t at = ((r * kv_heads + h) * capacity + pos[r]) * dim;
            norm_rope(k + (r * kv_heads + h) * dim, k_norm, eps, cos + r * dim, sin + r * dim, dim,
                      keys + at);
            __builtin_memcpy(values + at, v + (r * kv_heads + h) * dim, (size_t)dim * sizeof(float));
        }
    }
    int64_t longest = 0;
    for (int64_t r = 0; r < n; r++)
        if (pos[r] + 1 > longest) longest = pos[r] + 1;
    if (threads < 1 || n * heads < 2) threads = 1;
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t task = 0; task < n * heads; task++) {
        const int64_t r = task / heads, head = task % heads, h = head / groups;
        float* room = (float*)scratch_of((longest + 2 * dim) * (int64_t)sizeof(float));
        if (!room) {
            failed = 1;
            continue;
        }
        float* query = room;
        float* score = room + dim;
        float* acc = score + longest;
        norm_rope(q + (r * heads + head) * dim, q_norm, eps, cos + r * dim, sin + r * dim, dim, query);
        const int64_t p = pos[r];
        const int64_t first = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
        const float* kh = keys + (r * kv_heads + h) * capacity * dim;
        const float* vh = values + (r * kv_heads + h) * capacity * dim;
        float peak = -INFINITY;
        for (int64_t j = first; j <= p; j++) {
            score[j] = scale * dot_ps(query, kh + j * dim, dim);
            if (score[j] > peak) peak = score[j];
        }
        float total = 0.0f;
        for (int64_t j = first; j <= p; j++) {
            score[j] = expf(score[j] - peak);
            total += score[j];
        }
        for (int64_t d = 0; d < dim; d++) acc[d] = 0.0f;
        for (int64_t j = first; j <= p; j++) {
            const __m512 wj = _mm512_set1_ps(score[j] / total);
            const float* vj = vh + j * dim;
            for (int64_t d = 0; d < dim; d += 16) {
                const __mmask16 mask = tail_mask(dim - d);
                _mm512_mask_storeu_ps(acc + d, mask,
                                      _mm512_fmadd_ps(wj, _mm512_maskz_loadu_ps(mask, vj + d),
                                                      _mm512_maskz_loadu_ps(mask, acc + d)));
            }
        }
        __builtin_memcpy(out + (r * heads + head) * dim, acc, (size_t)dim * sizeof(float));
    }
    return failed ? 2 : 0;
}
