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
#include <omp.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define ROWS_PER_PASS 8
// up to this many rows, each row's low and high nibbles go to separate sums (integer: the
// same result), so that one row is not bound by the latency of one chain of VPDPBUSD
#define SPLIT_ROWS 4

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
            /* with few rows, the high nibbles in sums of their own: two dependency chains */ \
            __m512i dot1[ROWS], dot2[ROWS], dot1h[ROWS], dot2h[ROWS];                         \
            for (int m = 0; m < ROWS; m++) {                                                  \
                dot1[m] = dot2[m] = dot1h[m] = dot2h[m] = _mm512_setzero_si512();             \
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
                    if (ROWS <= SPLIT_ROWS)                                                   \
                        dot1h[m] = _mm512_dpbusd_epi32(dot1h[m], hi, _mm512_set1_epi32(a1));  \
                    else                                                                      \
                        dot1[m] = _mm512_dpbusd_epi32(dot1[m], hi, _mm512_set1_epi32(a1));    \
                    if (HALVES == 2) {                                                        \
                        __builtin_memcpy(&a0, x2 + m * K + at, 4);                            \
                        __builtin_memcpy(&a1, x2 + m * K + at + 4, 4);                        \
                        dot2[m] = _mm512_dpbusd_epi32(dot2[m], lo, _mm512_set1_epi32(a0));    \
                        if (ROWS <= SPLIT_ROWS)                                               \
                            dot2h[m] = _mm512_dpbusd_epi32(dot2h[m], hi, _mm512_set1_epi32(a1)); \
                        else                                                                  \
                            dot2[m] = _mm512_dpbusd_epi32(dot2[m], hi, _mm512_set1_epi32(a1)); \
                    }                                                                         \
                }                                                                             \
            }                                                                                 \
            const __m512 vs = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sc + g * 16))); \
            const __m512 vm = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(mn + g * 16))); \
            for (int m = 0; m < ROWS; m++) {                                                  \
                __m512i dot = _mm512_add_epi32(dot1[m], dot1h[m]);                            \
                if (HALVES == 2)                                                              \
                    dot = _mm512_add_epi32(_mm512_slli_epi32(dot, 7),                         \
                                           _mm512_add_epi32(dot2[m], dot2h[m]));              \
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

// The calling thread's scratch, grown as needed and kept. Taken by the exported functions
// on the calling thread before any parallel region; nothing inside a region grows it.
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

// Carves 64-byte aligned pieces out of one scratch block.
typedef struct {
    uint8_t* at;
    int64_t used;
} carver;

static void* carve(carver* c, int64_t bytes) {
    void* p = c->at ? c->at + c->used : NULL;
    c->used += (bytes + 63) / 64 * 64;
    return p;
}

static inline __mmask16 tail_mask(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}

// Which of `count` jobs a task of a shared loop belongs to: job i has tasks starts[i] ..
// starts[i + 1] - 1 (the last one's run to the loop's end; an empty job is never picked).
static inline int job_of(const int64_t* starts, int count, int64_t t) {
    int i = count - 1;
    while (t < starts[i]) i--;
    return i;
}

// ---- 4-bit matmuls ------------------------------------------------------------------------

typedef struct {
    const uint8_t* w;  // nibbles, scales and minimums in the layout above
    const uint16_t* sc;
    const uint16_t* mn;
    int64_t n, k, g;  // output rows, inputs, group size
} q4_weight;

static int q4_fits(const q4_weight* w) {
    return w->w && w->n % 16 == 0 && w->g > 0 && w->g % 16 == 0 && w->k % w->g == 0;
}

// The activations of M rows quantized for input width k and group size g.
typedef struct {
    int8_t* x1;
    int8_t* x2;
    float* dx;
    float* sx;
    int64_t m, k, g;
    int halves;
} q4_input;

static void q4_input_carve(carver* c, q4_input* in, int64_t m, int64_t k, int64_t g, int halves) {
    in->m = m, in->k = k, in->g = g, in->halves = halves;
    in->x1 = carve(c, m * k);
    in->x2 = carve(c, m * k);
    in->dx = carve(c, m * (k / g) * (int64_t)sizeof(float));
    in->sx = carve(c, m * (k / g) * (int64_t)sizeof(float));
}

static void q4_quantize(const float* x, const q4_input* in) {
    quantize_rows(x, in->m, in->k, in->g, in->halves, in->x1, in->x2, in->dx, in->sx);
}

// ys[i] (M, ws[i].n) = x @ W_i^T for `count` weights that take the same input, their blocks
// of 16 output rows shared out in chunks as threads come free (a thread the OS preempts --
// the HTTP side, a client on the same cores -- delays its chunk, not half the layer). A
// worksharing loop: inside a parallel region its threads share it, outside one it runs on
// the calling thread alone.
static void q4_matmuls(const q4_weight* ws, float* const* ys, int count, const q4_input* in) {
    int64_t starts[8], total = 0;
    for (int i = 0; i < count; i++) {
        starts[i] = total;
        total += ws[i].n / 16;
    }
    const int64_t threads = omp_get_num_threads();
    const int64_t chunk = total / (8 * threads) > 1 ? total / (8 * threads) : 1;
    const int64_t M = in->m, K = in->k, G = in->g, groups = K / G;
#pragma omp for schedule(dynamic, chunk)
    for (int64_t t = 0; t < total; t++) {
        const int i = job_of(starts, count, t);
        const q4_weight* W = &ws[i];
        const int64_t b = t - starts[i], N = W->n;
        const uint8_t* wb = W->w + b * (K / 2) * 16;
        const uint16_t* sb = W->sc + b * groups * 16;
        const uint16_t* mb = W->mn + b * groups * 16;
        for (int64_t m0 = 0; m0 < M; m0 += ROWS_PER_PASS) {
            const int64_t rows = M - m0 < ROWS_PER_PASS ? M - m0 : ROWS_PER_PASS;
            BLOCKS[in->halves - 1][rows](wb, sb, mb, in->x1 + m0 * K, in->x2 + m0 * K,
                                         in->dx + m0 * groups, in->sx + m0 * groups, K, G,
                                         ys[i] + m0 * N + b * 16, N);
        }
    }
}

// Returns 0; 1 when the shapes do not fit the layout, 2 when scratch memory ran out
// (nothing is written then). halves: 1 = activations in 8 bits, 2 = in two 8-bit halves
// (about 15 bits; twice the dot products).
int q4_matmul(const float* x, const uint8_t* w, const uint16_t* sc, const uint16_t* mn,
              int64_t M, int64_t N, int64_t K, int64_t G, int halves, float* y, int threads) {
    const q4_weight weight = {w, sc, mn, N, K, G};
    if (M < 0 || !q4_fits(&weight) || (halves != 1 && halves != 2)) return 1;
    if (M == 0) return 0;
    carver c = {NULL, 0};
    q4_input in;
    q4_input_carve(&c, &in, M, K, G, halves);
    c.at = scratch_of(c.used), c.used = 0;
    if (!c.at) return 2;
    q4_input_carve(&c, &in, M, K, G, halves);
    q4_quantize(x, &in);
    if (threads < 1 || N / 16 < 2 * threads) threads = 1;  // too little to share
#pragma omp parallel num_threads(threads)
    q4_matmuls(&weight, &y, 1, &in);
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

typedef struct {
    const int32_t* off;  // (slots + 1,): slot s's rank components are off[s] .. off[s + 1]
    const int8_t* a;
    const float* a_scale;
    const int8_t* b;
    const float* b_scale;
    int64_t slots, k, n;
} lora_weight;

static inline __m512 load_i8_as_ps(const int8_t* p, __mmask16 mask) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}

// The largest rank of any slot; -1 where the offsets or the rows' slots do not fit.
static int64_t lora_widest(const lora_weight* l, const int32_t* slot, int64_t seqs) {
    int64_t widest = 0;
    for (int64_t s = 0; s < l->slots; s++) {
        if (l->off[s + 1] < l->off[s]) return -1;
        if (l->off[s + 1] - l->off[s] > widest) widest = l->off[s + 1] - l->off[s];
    }
    for (int64_t i = 0; i < seqs; i++)
        if (slot[i] >= l->slots) return -1;
    return widest;
}

// For `count` LoRA blocks (ls[i] on input xs[i], into ys[i]; h[i] room for M x widest[i]):
// ys[i] += each row's delta. Two worksharing loops: the rank components (A), then the
// output columns (B).
static void lora_deltas(const lora_weight* ls, const float* const* xs, float* const* ys,
                        float* const* h, const int64_t* widest, int count, int64_t M,
                        int64_t T, const int32_t* slot) {
    int64_t starts[8], total = 0;
    for (int i = 0; i < count; i++) {
        starts[i] = total;
        total += M * widest[i];
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < total; t++) {
        const int i = job_of(starts, count, t);
        const lora_weight* l = &ls[i];
        const int64_t m = (t - starts[i]) / widest[i], r = (t - starts[i]) % widest[i];
        const int32_t s = slot[m / T];
        if (s < 0 || r >= l->off[s + 1] - l->off[s]) continue;
        const int64_t row = l->off[s] + r, K = l->k;
        const int8_t* ar = l->a + row * K;
        const float* xm = xs[i] + m * K;
        // four sums, over every fourth vector: four dependency chains
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        int64_t k = 0;
        for (; k + 64 <= K; k += 64)
            for (int j = 0; j < 4; j++)
                acc[j] = _mm512_fmadd_ps(load_i8_as_ps(ar + k + 16 * j, 0xFFFF),
                                         _mm512_loadu_ps(xm + k + 16 * j), acc[j]);
        for (int j = 0; k < K; k += 16, j++) {
            const __mmask16 mask = tail_mask(K - k);
            acc[j] = _mm512_fmadd_ps(load_i8_as_ps(ar + k, mask), _mm512_maskz_loadu_ps(mask, xm + k), acc[j]);
        }
        const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        h[i][m * widest[i] + r] = _mm512_reduce_add_ps(sum) * l->a_scale[row];
    }
    total = 0;
    for (int i = 0; i < count; i++) {
        starts[i] = total;
        total += widest[i] ? M * ((ls[i].n + 63) / 64) : 0;
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < total; t++) {
        const int i = job_of(starts, count, t);
        const lora_weight* l = &ls[i];
        const int64_t N = l->n, col_blocks = (N + 63) / 64;
        const int64_t m = (t - starts[i]) / col_blocks, cb = (t - starts[i]) % col_blocks;
        const int32_t s = slot[m / T];
        if (s < 0) continue;
        const int64_t rank = l->off[s + 1] - l->off[s];
        if (rank == 0) continue;
        const float* hm = h[i] + m * widest[i];
        // the block's four vectors of 16 columns side by side: four dependency chains
        const int64_t n0 = cb * 64;
        __mmask16 mask[4];
        __m512 acc[4];
        for (int j = 0; j < 4; j++) {
            mask[j] = n0 + 16 * j < N ? tail_mask(N - n0 - 16 * j) : 0;
            acc[j] = _mm512_setzero_ps();
        }
        for (int64_t r = 0; r < rank; r++) {
            const __m512 hr = _mm512_set1_ps(hm[r]);
            const int8_t* br = l->b + (l->off[s] + r) * N + n0;
            for (int j = 0; j < 4; j++)
                acc[j] = _mm512_fmadd_ps(hr, load_i8_as_ps(br + 16 * j, mask[j]), acc[j]);
        }
        for (int j = 0; j < 4; j++) {
            float* out = ys[i] + m * N + n0 + 16 * j;
            const __m512 scale = _mm512_maskz_loadu_ps(mask[j], l->b_scale + s * N + n0 + 16 * j);
            _mm512_mask_storeu_ps(out, mask[j], _mm512_fmadd_ps(acc[j], scale, _mm512_maskz_loadu_ps(mask[j], out)));
        }
    }
}

int lora_add(const float* x, int64_t M, int64_t T, int64_t K, int64_t N, const int32_t* slot,
             int64_t slots, const int32_t* off, const int8_t* a, const float* a_scale,
             const int8_t* b, const float* b_scale, float* y, int threads) {
    if (M < 0 || T < 1 || K < 1 || N < 1 || M % T) return 1;
    if (M == 0) return 0;
    const lora_weight l = {off, a, a_scale, b, b_scale, slots, K, N};
    const int64_t widest = lora_widest(&l, slot, M / T);
    if (widest < 0) return 1;
    if (widest == 0) return 0;
    float* h = (float*)scratch_of(M * widest * (int64_t)sizeof(float));
    if (!h) return 2;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    lora_deltas(&l, &x, &y, &h, &widest, 1, M, T, slot);
    return 0;
}

// ---- RMS norm, one call for all rows -----------------------------------------------------
//
// y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w, in float32, plus residual[r, :] where
// a residual is given (NULL: none): a decode step runs some hundred of them on a few rows
// each, one call instead of five or six framework operators.
static void norm_rows(const float* x, int64_t rows, int64_t dim, const float* w, float eps,
                      const float* residual, float* y) {
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
}

int rms_norm(const float* x, int64_t rows, int64_t dim, const float* w, float eps,
             const float* residual, float* y) {
    if (rows < 0 || dim < 1) return 1;
    norm_rows(x, rows, dim, w, eps, residual, y);
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

static void act_range(const float* gate, const float* up, int64_t from, int64_t to, int act, float* y) {
    const __m512 one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
    for (int64_t i = from; i < to; i += 16) {
        const __mmask16 mask = tail_mask(to - i);
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
}

int act_mul(const float* gate, const float* up, int64_t n, int act, float* y) {
    if (n < 0 || (act != 0 && act != 1)) return 1;
    act_range(gate, up, 0, n, act, y);
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

typedef struct {
    int64_t heads, kv_heads, dim, window;
    const float* q_norm;  // (dim,) or NULL
    const float* k_norm;
    float eps, scale;
} attention_spec;

typedef struct {
    const float* cos;  // (n, dim)
    const float* sin;
    const int64_t* pos;  // (n,)
    float* keys;  // (rows, kv_heads, capacity, dim)
    float* values;
    int64_t rows, capacity;
} attention_cache;

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

static int attention_fits(const attention_spec* a, const attention_cache* c, int64_t n) {
    if (n < 0 || n > c->rows || a->heads < 1 || a->kv_heads < 1 || a->heads % a->kv_heads ||
        a->dim < 2 || a->dim % 2 || a->window < 0)
        return 0;
    for (int64_t r = 0; r < n; r++)
        if (c->pos[r] < 0 || c->pos[r] >= c->capacity) return 0;
    return 1;
}

// Floats of room each thread needs (query, scores, sums).
static int64_t attention_room(const attention_spec* a, const attention_cache* c, int64_t n) {
    int64_t longest = 0;
    for (int64_t r = 0; r < n; r++)
        if (c->pos[r] + 1 > longest) longest = c->pos[r] + 1;
    return (longest + 2 * a->dim + 15) / 16 * 16;
}

// The keys and values of n rows into the cache (on one thread: a few kilobytes).
static void attention_write(const attention_spec* a, const attention_cache* c, const float* k,
                            const float* v, int64_t n) {
    const int64_t dim = a->dim, kvh = a->kv_heads;
    for (int64_t r = 0; r < n; r++) {
        for (int64_t h = 0; h < kvh; h++) {
            const int64_t at = ((r * kvh + h) * c->capacity + c->pos[r]) * dim;
            norm_rope(k + (r * kvh + h) * dim, a->k_norm, a->eps, c->cos + r * dim,
                      c->sin + r * dim, dim, c->keys + at);
            __builtin_memcpy(c->values + at, v + (r * kvh + h) * dim, (size_t)dim * sizeof(float));
        }
    }
}

// Each (row, query head) as a worksharing loop; room: `per_thread` floats for each thread.
static void attention_heads(const attention_spec* a, const attention_cache* c, const float* q,
                            int64_t n, float* room, int64_t per_thread, float* out) {
    const int64_t dim = a->dim, heads = a->heads, groups = heads / a->kv_heads;
    float* query = room + omp_get_thread_num() * per_thread;
    float* acc = query + dim;
    float* score = acc + dim;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n * heads; task++) {
        const int64_t r = task / heads, head = task % heads, h = head / groups;
        norm_rope(q + (r * heads + head) * dim, a->q_norm, a->eps, c->cos + r * dim,
                  c->sin + r * dim, dim, query);
        const int64_t p = c->pos[r];
        const int64_t first = a->window > 0 && p - a->window + 1 > 0 ? p - a->window + 1 : 0;
        const float* kh = c->keys + (r * a->kv_heads + h) * c->capacity * dim;
        const float* vh = c->values + (r * a->kv_heads + h) * c->capacity * dim;
        float peak = -INFINITY;
        for (int64_t j = first; j <= p; j++) {
            score[j] = a->scale * dot_ps(query, kh + j * dim, dim);
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
}

int attend_decode(const float* q, const float* k, const float* v, int64_t n, int64_t heads,
                  int64_t kv_heads, int64_t dim, const float* q_norm, const float* k_norm,
                  float eps, const float* cos, const float* sin, const int64_t* pos,
                  float* keys, float* values, int64_t rows, int64_t capacity, int64_t window,
                  float scale, float* out, int threads) {
    const attention_spec a = {heads, kv_heads, dim, window, q_norm, k_norm, eps, scale};
    const attention_cache c = {cos, sin, pos, keys, values, rows, capacity};
    if (!attention_fits(&a, &c, n)) return 1;
    if (n == 0) return 0;
    if (threads < 1 || n * heads < 2) threads = 1;
    const int64_t per_thread = attention_room(&a, &c, n);
    float* room = (float*)scratch_of(threads * per_thread * (int64_t)sizeof(float));
    if (!room) return 2;
    attention_write(&a, &c, k, v, n);
#pragma omp parallel num_threads(threads)
    attention_heads(&a, &c, q, n, room, per_thread, out);
    return 0;
}

// ---- A whole decoder layer of a decode step ---------------------------------------------
//
// h (n, hidden) in place: the layer's norms, its seven 4-bit projections with each row's
// LoRA delta (slot per row, NULL: no adapter rows), attention and the gated MLP, in one
// parallel region (one fork and join where the calls one by one take some twenty), with
// the same arithmetic as those calls: a row's result is the same bit for bit either way.
// Gemma (gemma = 1): h += norm_post_attn(o); h += norm_post_ff(down(act(gate) * up)) over
// norm_pre_ff(h); Llama: h += o; h += down(...) over norm_post_attn(h).

enum { Q, K_, V, O, GATE, UP, DOWN, PROJECTIONS };

typedef struct {
    int64_t hidden, inter;
    int32_t gemma, act, halves, pad;
    float eps;  // the layer norms'
    float pad2;
    const float* norm_in;
    const float* norm_post_attn;
    const float* norm_pre_ff;  // Gemma's two more (NULL for Llama)
    const float* norm_post_ff;
    attention_spec attention;
    q4_weight proj[PROJECTIONS];
    lora_weight lora[PROJECTIONS];  // a NULL: no LoRA block on that projection
} layer_spec;

int decode_layer(const layer_spec* L, float* h, int64_t n, const int32_t* slot,
                 const float* cos, const float* sin, const int64_t* pos, float* keys,
                 float* values, int64_t rows, int64_t capacity, int threads) {
    const attention_spec* a = &L->attention;
    const attention_cache c = {cos, sin, pos, keys, values, rows, capacity};
    const int64_t D = L->hidden, I = L->inter, qd = a->heads * a->dim, kvd = a->kv_heads * a->dim;
    const int64_t G = L->proj[Q].g;
    if (!attention_fits(a, &c, n) || (L->halves != 1 && L->halves != 2) ||
        (L->act != 0 && L->act != 1) || (L->gemma && (!L->norm_pre_ff || !L->norm_post_ff)))
        return 1;
    const int64_t shapes[PROJECTIONS][2] = {{qd, D}, {kvd, D}, {kvd, D}, {D, qd}, {I, D}, {I, D}, {D, I}};
    int64_t widest[PROJECTIONS];
    for (int i = 0; i < PROJECTIONS; i++) {
        const q4_weight* w = &L->proj[i];
        if (!q4_fits(w) || w->n != shapes[i][0] || w->k != shapes[i][1] || w->g != G) return 1;
        widest[i] = 0;
        const lora_weight* l = &L->lora[i];
        if (slot && l->a) {
            if (l->k != w->k || l->n != w->n) return 1;
            widest[i] = lora_widest(l, slot, n);
            if (widest[i] < 0) return 1;
        }
    }
    if (n == 0) return 0;
    if (threads < 1) threads = 1;
    const int64_t per_thread = attention_room(a, &c, n);
    // scratch: measured first (NULL base), then carved for real
    carver cv = {NULL, 0};
    q4_input in_d, in_q, in_i;
    float *xn, *qo, *ko, *vo, *att, *oo, *go, *uo, *act, *dn, *room, *hs[PROJECTIONS];
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1) {
            cv.at = scratch_of(cv.used), cv.used = 0;
            if (!cv.at) return 2;
        }
        q4_input_carve(&cv, &in_d, n, D, G, L->halves);
        q4_input_carve(&cv, &in_q, n, qd, G, L->halves);
        q4_input_carve(&cv, &in_i, n, I, G, L->halves);
        xn = carve(&cv, n * D * 4), qo = carve(&cv, n * qd * 4), ko = carve(&cv, n * kvd * 4);
        vo = carve(&cv, n * kvd * 4), att = carve(&cv, n * qd * 4), oo = carve(&cv, n * D * 4);
        go = carve(&cv, n * I * 4), uo = carve(&cv, n * I * 4), act = carve(&cv, n * I * 4);
        dn = carve(&cv, n * D * 4), room = carve(&cv, threads * per_thread * 4);
        for (int i = 0; i < PROJECTIONS; i++) hs[i] = carve(&cv, n * widest[i] * 4 + 4);
    }
    const lora_weight* l = L->lora;
    float* const qkv_out[3] = {qo, ko, vo};
    const float* const xs_qkv[3] = {xn, xn, xn};
    float* const gu_out[2] = {go, uo};
#pragma omp parallel num_threads(threads)
    {
#pragma omp single
        {
            norm_rows(h, n, D, L->norm_in, L->eps, NULL, xn);
            q4_quantize(xn, &in_d);
        }
        q4_matmuls(&L->proj[Q], qkv_out, 3, &in_d);
        if (slot) lora_deltas(&l[Q], xs_qkv, qkv_out, &hs[Q], &widest[Q], 3, n, 1, slot);
#pragma omp single
        attention_write(a, &c, ko, vo, n);
        attention_heads(a, &c, qo, n, room, per_thread, att);
#pragma omp single
        q4_quantize(att, &in_q);
        q4_matmuls(&L->proj[O], &oo, 1, &in_q);
        if (slot) lora_deltas(&l[O], (const float* const*)&att, &oo, &hs[O], &widest[O], 1, n, 1, slot);
#pragma omp single
        {
            if (L->gemma) {
                norm_rows(oo, n, D, L->norm_post_attn, L->eps, h, h);
                norm_rows(h, n, D, L->norm_pre_ff, L->eps, NULL, xn);
            } else {
                for (int64_t j = 0; j < n * D; j++) h[j] += oo[j];
                norm_rows(h, n, D, L->norm_post_attn, L->eps, NULL, xn);
            }
            q4_quantize(xn, &in_d);
        }
        q4_matmuls(&L->proj[GATE], gu_out, 2, &in_d);
        if (slot) lora_deltas(&l[GATE], xs_qkv, gu_out, &hs[GATE], &widest[GATE], 2, n, 1, slot);
#pragma omp single
        {
            act_range(go, uo, 0, n * I, L->act, act);
            q4_quantize(act, &in_i);
        }
        q4_matmuls(&L->proj[DOWN], &dn, 1, &in_i);
        if (slot) lora_deltas(&l[DOWN], (const float* const*)&act, &dn, &hs[DOWN], &widest[DOWN], 1, n, 1, slot);
#pragma omp single
        {
            if (L->gemma)
                norm_rows(dn, n, D, L->norm_post_ff, L->eps, h, h);
            else
                for (int64_t j = 0; j < n * D; j++) h[j] += dn[j];
        }
    }
    return 0;
}

// ---- The layers of a decode step, one after the other, in one call ----------------------
//
// decode_layer for layers[0 .. count-1] over h in turn, each with its own cache (keys[i],
// values[i]), rotary tables (cos[i], sin[i]: its attention type's) and rows' slots
// (slots[i], NULL: no adapter rows), all caches (rows, kv_heads, capacity, dim). One call
// where the layers one by one take a call each, with Python between them holding the GIL
// that a server's event loop wants too. After each layer a nonzero *pause (another thread
// sets it: a request came in; NULL: never) ends the call early, so that the caller can work
// between two layers. *done: how many layers ran. A layer that fails writes nothing (see
// decode_layer); those before it have run.
int decode_layers(const layer_spec* const* layers, int64_t count, float* h, int64_t n,
                  const int32_t* const* slots, const float* const* cos, const float* const* sin,
                  const int64_t* pos, float* const* keys, float* const* values, int64_t rows,
                  int64_t capacity, const int32_t* pause, int threads, int64_t* done) {
    *done = 0;
    for (int64_t i = 0; i < count; i++) {
        const int status = decode_layer(layers[i], h, n, slots[i], cos[i], sin[i], pos, keys[i],
                                        values[i], rows, capacity, threads);
        if (status) return status;
        *done = i + 1;
        if (pause && __atomic_load_n(pause, __ATOMIC_ACQUIRE)) break;
    }
    return 0;
}
