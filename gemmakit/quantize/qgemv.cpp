// gemmakit weight-only quantized GEMV and dequantize kernels, compiled on first use by kernels.py
// (shipped as package data; a change of this text changes the build's cache key, so a stale build is
// never loaded).
//
// The ISA is chosen at compile time: -march=native (or GEMMAKIT_KERNEL_ISA's flags, see kernels.py)
// selects the AVX-512 or the AVX2+FMA path, else plain C++ (also used for int4 rows whose length is
// not a multiple of 128). Each tile is R weight rows x up to 4 activation rows (R = 8 for int4 decode
// on AVX-512): weights are widened to fp32 in registers and fma'd against fp32 activations, so the
// result is the fp32 product with the dequantized matrix up to summation order. int4 avoids byte
// shuffles entirely (see the int4 layout below): ~3 vector instructions per 16 weights; its mild
// cancellation (1 + q/16 instead of q) leaves int4 GEMV errors ~1.5e-6 of the output scale, against
// 2.7e-7 for fp32 F.linear (bench_kernels notes). The bf16 GEMV widens each weight with a 16-bit
// shift (exact) and fma's in fp32 like int8. Rows are split over OpenMP threads.
//
// -ffp-contract=off keeps the dequantizers bit-equal to the PyTorch reference (no implicit fma).
//
// int8: w[n,k] = q[n,k] * scale[n]; q int8 in [-127, 127], scale fp32.
// int4: w[n,k] = q[n,k] * s[n,g] + m[n,g], g = k / G; q in [0, 15]; s and m are bf16 packed in one
//   uint32 (high half s, low half m). Each row is cut into blocks of 128 columns (the last block may
//   hold 32, 64 or 96): a block of B columns is B/8 little-endian uint32 "lanes"; column D*i + L of
//   a block with D = B/8 lanes is nibble i (bits 4i..4i+3) of lane L. A 16-lane vector load thus
//   yields column 16i + L in lane L for every i: shift + mask, no byte shuffles.
// int4 GEMV trick: (nibble << 19) | 0x3F800000 is the float f = 1 + q/16 exactly, so per group
//   sum(w x) = 16 s sum(f x) + (m - 16 s) sum(x); sum(x) per group is computed once per call.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <stdint.h>
#include <string.h>
#include <stdlib.h>

namespace {

// Software prefetch of the NEXT tile of rows (to L2) while this tile is computed: each tile reads R
// rows in lockstep, i.e. R short interleaved streams that the hardware prefetcher ramps up on too
// late. Measured on a 2-core Xeon, weights streamed from DRAM: int8 12.8 -> 18.9, int4 15.7 -> 25.1
// Gweights/s for 16384x2048 (prefetching further along the same row instead: no gain).
#if defined(__x86_64__) || defined(__i386__)
#define GK_PREFETCH(p) _mm_prefetch((const char*)(p), _MM_HINT_T1)
#else
#define GK_PREFETCH(p) __builtin_prefetch((const void*)(p), 0, 2)
#endif

inline float hi_f32(uint32_t v) { uint32_t b = v & 0xFFFF0000u; float f; memcpy(&f, &b, 4); return f; }
inline float lo_f32(uint32_t v) { uint32_t b = v << 16; float f; memcpy(&f, &b, 4); return f; }
inline int threads_for(int64_t work, int nthreads) { return work < (1 << 16) ? 1 : nthreads; }
#if defined(__AVX2__) && defined(__FMA__)
// horizontal sum of 8 lanes (shared by every AVX2 tile)
inline float hsum256(__m256 a) {
  __m128 v = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  v = _mm_add_ss(v, _mm_movehdup_ps(v));
  return _mm_cvtss_f32(v);
}
#endif

// nibble q of column k in an int4 row (any block, any position): the scalar definition of the layout
inline int nibble(const uint8_t* row, int64_t K, int64_t k) {
  const int64_t b0 = k / 128 * 128, D = (K - b0 >= 128 ? 128 : K - b0) / 8, e = k - b0;
  const int64_t L = e % D, i = e / D;
  const uint8_t byte = row[b0 / 2 + 4 * L + i / 2];
  return (i & 1) ? (byte >> 4) : (byte & 15);
}

// ---- int8: R weight rows x MB activation rows --------------------------------------------------
template <int R, int MB>
inline void q8_tile(const float* x, int64_t K, const int8_t* w, const float* scale, float* y, int64_t N) {
  float sum[R][MB];
  int64_t k = 0;
#if defined(__AVX512F__)
  __m512 acc[R][MB];
  for (int r = 0; r < R; r++) for (int m = 0; m < MB; m++) acc[r][m] = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    if ((k & 63) == 0)
      for (int r = 0; r < R; r++) GK_PREFETCH(w + (r + R) * K + k);
    __m512 xv[MB];
    for (int m = 0; m < MB; m++) xv[m] = _mm512_loadu_ps(x + m * K + k);
    for (int r = 0; r < R; r++) {
      __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + r * K + k))));
      for (int m = 0; m < MB; m++) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; r++) for (int m = 0; m < MB; m++) sum[r][m] = _mm512_reduce_add_ps(acc[r][m]);
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 acc[R][MB];
  for (int r = 0; r < R; r++) for (int m = 0; m < MB; m++) acc[r][m] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    if ((k & 63) == 0)
      for (int r = 0; r < R; r++) GK_PREFETCH(w + (r + R) * K + k);
    __m256 xv[MB];
    for (int m = 0; m < MB; m++) xv[m] = _mm256_loadu_ps(x + m * K + k);
    for (int r = 0; r < R; r++) {
      __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w + r * K + k))));
      for (int m = 0; m < MB; m++) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; r++) for (int m = 0; m < MB; m++) sum[r][m] = hsum256(acc[r][m]);
#else
  for (int r = 0; r < R; r++) for (int m = 0; m < MB; m++) sum[r][m] = 0.0f;
#endif
  for (; k < K; k++)
    for (int r = 0; r < R; r++) for (int m = 0; m < MB; m++) sum[r][m] += (float)w[r * K + k] * x[m * K + k];
  for (int r = 0; r < R; r++) for (int m = 0; m < MB; m++) y[m * N + r] = sum[r][m] * scale[r];
}

// ---- int4 ------------------------------------------------------------------------------------------
// Full 128-column blocks run in SIMD; the tail block (K % 128 columns) and non-x86 builds run the
// scalar definition. xs[m * NG + g] = sum of x[m] over group g (for the min term).
#if defined(__AVX512F__)
template <int I>
inline __m512 f_of(__m512i v) {  // 1 + q_I / 16 in every lane
  const __m512i t = (4 * I <= 19) ? _mm512_slli_epi32(v, (19 - 4 * I) & 31) : _mm512_srli_epi32(v, (4 * I - 19) & 31);
  return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(t, _mm512_set1_epi32(0x00780000), _mm512_set1_epi32(0x3F800000), 0xEA));
}
template <int R, int MB, int I>
inline void q4_step(const __m512i* v, const float* x, int64_t K, int64_t k, __m512 (*gacc)[MB]) {
  __m512 xv[MB];
  for (int m = 0; m < MB; m++) xv[m] = _mm512_loadu_ps(x + m * K + k + 16 * I);
  for (int r = 0; r < R; r++) {
    const __m512 f = f_of<I>(v[r]);
    for (int m = 0; m < MB; m++) gacc[r][m] = _mm512_fmadd_ps(f, xv[m], gacc[r][m]);
  }
}
#define GK_VEC __m512
#define GK_ZERO _mm512_setzero_ps()
#define GK_FMA _mm512_fmadd_ps
#define GK_HSUM _mm512_reduce_add_ps
#define GK_SCALE(p) _mm512_castsi512_ps(_mm512_and_si512(_mm512_set1_epi32((int)*(p)), _mm512_set1_epi32((int)0xFFFF0000u)))
#elif defined(__AVX2__) && defined(__FMA__)
template <int I>
inline __m256 f_of(__m256i v) {
  const __m256i t = (4 * I <= 19) ? _mm256_slli_epi32(v, (19 - 4 * I) & 31) : _mm256_srli_epi32(v, (4 * I - 19) & 31);
  return _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(t, _mm256_set1_epi32(0x00780000)), _mm256_set1_epi32(0x3F800000)));
}
template <int R, int MB, int I>
inline void q4_step(const __m256i* v0, const __m256i* v1, const float* x, int64_t K, int64_t k, __m256 (*gacc)[MB]) {
  for (int half = 0; half < 2; half++) {
    __m256 xv[MB];
    for (int m = 0; m < MB; m++) xv[m] = _mm256_loadu_ps(x + m * K + k + 16 * I + 8 * half);
    for (int r = 0; r < R; r++) {
      const __m256 f = f_of<I>(half ? v1[r] : v0[r]);
      for (int m = 0; m < MB; m++) gacc[r][m] = _mm256_fmadd_ps(f, xv[m], gacc[r][m]);
    }
  }
}
#define GK_VEC __m256
#define GK_ZERO _mm256_setzero_ps()
#define GK_FMA _mm256_fmadd_ps
#define GK_HSUM hsum256
#define GK_SCALE(p) _mm256_castsi256_ps(_mm256_and_si256(_mm256_set1_epi32((int)*(p)), _mm256_set1_epi32((int)0xFFFF0000u)))
#endif

template <int R, int MB>
inline void q4_tile(const float* x, const float* xs, int64_t K, const uint8_t* w, const uint32_t* sm, int64_t G,
                    float* y, int64_t N) {
  const int64_t NG = K / G, KB = K / 2, KF = K / 128 * 128;
  (void)KF;
  float sum[R][MB];
  for (int r = 0; r < R; r++) for (int m = 0; m < MB; m++) sum[r][m] = 0.0f;
#if defined(GK_VEC)
  GK_VEC tot[R][MB], gacc[R][MB];
  for (int r = 0; r < R; r++) for (int m = 0; m < MB; m++) { tot[r][m] = GK_ZERO; gacc[r][m] = GK_ZERO; }
  // one group ends every `per` 16-column steps (G >= 16; a group may span blocks)
  const int64_t per = G / 16;
  int64_t step = 0;
  auto flush = [&](int64_t k_end) {
    const int64_t g = k_end / G - 1;
    for (int r = 0; r < R; r++) {
      const GK_VEC s = GK_SCALE(sm + r * NG + g);
      for (int m = 0; m < MB; m++) { tot[r][m] = GK_FMA(gacc[r][m], s, tot[r][m]); gacc[r][m] = GK_ZERO; }
    }
  };
#if defined(__AVX512F__)
  for (int64_t k = 0; k < KF; k += 128) {
    __m512i v[R];
    for (int r = 0; r < R; r++) v[r] = _mm512_loadu_si512((const void*)(w + r * KB + k / 2));
    for (int r = 0; r < R; r++) GK_PREFETCH(w + (r + R) * KB + k / 2);
#define GK_STEP(I) q4_step<R, MB, I>(v, x, K, k, gacc); if (++step == per) { step = 0; flush(k + 16 * (I + 1)); }
    GK_STEP(0) GK_STEP(1) GK_STEP(2) GK_STEP(3) GK_STEP(4) GK_STEP(5) GK_STEP(6) GK_STEP(7)
#undef GK_STEP
  }
#else
  for (int64_t k = 0; k < KF; k += 128) {
    __m256i v0[R], v1[R];  // lanes 0-7 and 8-15 of the block: columns 16i + L and 16i + 8 + L
    for (int r = 0; r < R; r++) {
      v0[r] = _mm256_loadu_si256((const __m256i*)(w + r * KB + k / 2));
      v1[r] = _mm256_loadu_si256((const __m256i*)(w + r * KB + k / 2 + 32));
      GK_PREFETCH(w + (r + R) * KB + k / 2);
    }
#define GK_STEP(I) q4_step<R, MB, I>(v0, v1, x, K, k, gacc); if (++step == per) { step = 0; flush(k + 16 * (I + 1)); }
    GK_STEP(0) GK_STEP(1) GK_STEP(2) GK_STEP(3) GK_STEP(4) GK_STEP(5) GK_STEP(6) GK_STEP(7)
#undef GK_STEP
  }
#endif
  for (int r = 0; r < R; r++) for (int m = 0; m < MB; m++) sum[r][m] = 16.0f * GK_HSUM(tot[r][m]);
#endif
  // min term: sum_g (m_g - 16 s_g) xs_g over the groups handled above; tail groups exactly, scalar
  for (int r = 0; r < R; r++) {
    const uint32_t* smr = sm + r * NG;
    const uint8_t* wr = w + r * KB;
#if defined(GK_VEC)
    const int64_t g_simd = KF / G;
#else
    const int64_t g_simd = 0;
#endif
    for (int64_t g = 0; g < g_simd; g++) {
      const float c = lo_f32(smr[g]) - 16.0f * hi_f32(smr[g]);
      for (int m = 0; m < MB; m++) sum[r][m] += c * xs[m * NG + g];
    }
    for (int64_t k = g_simd * G; k < K; k++) {
      const uint32_t v = smr[k / G];
      const float wk = (float)nibble(wr, K, k) * hi_f32(v) + lo_f32(v);
      for (int m = 0; m < MB; m++) sum[r][m] += wk * x[m * K + k];
    }
  }
  for (int r = 0; r < R; r++) for (int m = 0; m < MB; m++) y[m * N + r] = sum[r][m];
}

template <int MB>
void q8_rows(const float* x, int64_t K, const int8_t* w, const float* scale, int64_t N, float* y, int nt) {
  const int64_t nblk = (N + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t b = 0; b < nblk; b++) {
    const int64_t n = b * 4;
    if (n + 4 <= N) q8_tile<4, MB>(x, K, w + n * K, scale + n, y + n, N);
    else for (int64_t j = n; j < N; j++) q8_tile<1, MB>(x, K, w + j * K, scale + j, y + j, N);
  }
}

template <int MB>
void q4_rows(const float* x, const float* xs, int64_t K, const uint8_t* w, const uint32_t* sm, int64_t G, int64_t N,
             float* y, int nt) {
#if defined(__AVX512F__) || !(defined(__AVX2__) && defined(__FMA__))
  constexpr int R = MB == 1 ? 8 : MB <= 2 ? 4 : 2;
#else
  constexpr int R = MB <= 2 ? 2 : 1;  // 16 ymm registers: two lane halves per weight row
#endif
  const int64_t nblk = (N + R - 1) / R, NG = K / G, KB = K / 2;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t b = 0; b < nblk; b++) {
    const int64_t n = b * R;
    if (n + R <= N) q4_tile<R, MB>(x, xs, K, w + n * KB, sm + n * NG, G, y + n, N);
    else for (int64_t j = n; j < N; j++) q4_tile<1, MB>(x, xs, K, w + j * KB, sm + j * NG, G, y + j, N);
  }
}

// ---- bf16: w[n,k] = bf16 bits << 16 as fp32; R weight rows x MB activation rows ------------------
// Each R-row tile prefetches the next tile's rows like int8 (one line per row per 64 bytes = 32 cols).
inline float bf16_f32(uint16_t v) { uint32_t b = (uint32_t)v << 16; float f; memcpy(&f, &b, 4); return f; }

template <int R, int MB>
inline void bf_tile(const float* x, int64_t K, const uint16_t* w, float* y, int64_t N) {
  float sum[R][MB];
  int64_t k = 0;
#if defined(__AVX512F__)
  __m512 acc[R][MB];
  for (int r = 0; r < R; r++) for (int m = 0; m < MB; m++) acc[r][m] = _mm512_setzero_ps();
  for (; k + 32 <= K; k += 32) {
    for (int r = 0; r < R; r++) GK_PREFETCH(w + (r + R) * K + k);
    for (int h = 0; h < 32; h += 16) {
      __m512 xv[MB];
      for (int m = 0; m < MB; m++) xv[m] = _mm512_loadu_ps(x + m * K + k + h);
      for (int r = 0; r < R; r++) {
        const __m512i e = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(w + r * K + k + h)));
        const __m512 wv = _mm512_castsi512_ps(_mm512_slli_epi32(e, 16));
        for (int m = 0; m < MB; m++) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; r++) for (int m = 0; m < MB; m++) sum[r][m] = _mm512_reduce_add_ps(acc[r][m]);
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 acc[R][MB];
  for (int r = 0; r < R; r++) for (int m = 0; m < MB; m++) acc[r][m] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    if ((k & 31) == 0)
      for (int r = 0; r < R; r++) GK_PREFETCH(w + (r + R) * K + k);
    __m256 xv[MB];
    for (int m = 0; m < MB; m++) xv[m] = _mm256_loadu_ps(x + m * K + k);
    for (int r = 0; r < R; r++) {
      const __m256i e = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(w + r * K + k)));
      const __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(e, 16));
      for (int m = 0; m < MB; m++) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; r++) for (int m = 0; m < MB; m++) sum[r][m] = hsum256(acc[r][m]);
#else
  for (int r = 0; r < R; r++) for (int m = 0; m < MB; m++) sum[r][m] = 0.0f;
#endif
  for (; k < K; k++)
    for (int r = 0; r < R; r++) for (int m = 0; m < MB; m++) sum[r][m] += bf16_f32(w[r * K + k]) * x[m * K + k];
  for (int r = 0; r < R; r++) for (int m = 0; m < MB; m++) y[m * N + r] = sum[r][m];
}

template <int MB>
void bf_rows(const float* x, int64_t K, const uint16_t* w, int64_t N, float* y, int nt) {
  constexpr int R = 4;  // 16384x2048, M=1, weights from DRAM: R=2 23.8, R=4 25.7, R=8 24.8 GB/s
  const int64_t nblk = (N + R - 1) / R;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t b = 0; b < nblk; b++) {
    const int64_t n = b * R;
    if (n + R <= N) bf_tile<R, MB>(x, K, w + n * K, y + n, N);
    else for (int64_t j = n; j < N; j++) bf_tile<1, MB>(x, K, w + j * K, y + j, N);
  }
}

// Dequantizers, templated on the output: float, or bf16 bits (uint16_t) for the AMX prefill GEMM.
inline void put(float* o, float v) { *o = v; }
inline void put(uint16_t* o, float v) {  // round to nearest even; weights are finite
  uint32_t b;
  memcpy(&b, &v, 4);
  *o = (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

template <typename Out>
void q8_dequant(const int8_t* w, const float* scale, int64_t r0, int64_t r1, int64_t K, Out* out,
                int nthreads) {
  const int nt = threads_for((r1 - r0) * K, nthreads);
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t n = r0; n < r1; n++) {
    const int8_t* wr = w + n * K;
    Out* o = out + (n - r0) * K;
    const float s = scale[n];
    for (int64_t k = 0; k < K; k++) put(o + k, (float)wr[k] * s);
  }
}

template <typename Out>
void q4_dequant(const uint8_t* w, const uint32_t* sm, int64_t r0, int64_t r1, int64_t K, int64_t G,
                Out* out, int nthreads) {
  const int nt = threads_for((r1 - r0) * K, nthreads);
  const int64_t NG = K / G, KB = K / 2, KF = K / 128 * 128;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t n = r0; n < r1; n++) {
    const uint8_t* wr = w + n * KB;
    const uint32_t* smr = sm + n * NG;
    Out* o = out + (n - r0) * K;
    for (int64_t k = 0; k < KF; k += 128) {
      uint32_t lane[16];
      memcpy(lane, wr + k / 2, 64);
      for (int i = 0; i < 8; i++) {
        const uint32_t v = smr[(k + 16 * i) / G];
        const float s = hi_f32(v), mn = lo_f32(v);
        for (int L = 0; L < 16; L++) put(o + k + 16 * i + L, (float)((lane[L] >> (4 * i)) & 15u) * s + mn);
      }
    }
    for (int64_t k = KF; k < K; k++) {
      const uint32_t v = smr[k / G];
      put(o + k, (float)nibble(wr, K, k) * hi_f32(v) + lo_f32(v));
    }
  }
}

}  // namespace

extern "C" {

int gk_abi(void) { return 4; }

const char* gk_isa(void) {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "scalar";
#endif
}

// y[M, N] = x[M, K] @ dequant(w)^T, all contiguous row-major.
void gk_q8_gemv(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, int64_t N, float* y,
                int nthreads) {
  const int nt = threads_for(N * K, nthreads);
  for (int64_t m = 0; m < M; m += 4) {
    const float* xm = x + m * K;
    float* ym = y + m * N;
    switch (M - m >= 4 ? 4 : M - m) {
      case 1: q8_rows<1>(xm, K, w, scale, N, ym, nt); break;
      case 2: q8_rows<2>(xm, K, w, scale, N, ym, nt); break;
      case 3: q8_rows<3>(xm, K, w, scale, N, ym, nt); break;
      default: q8_rows<4>(xm, K, w, scale, N, ym, nt); break;
    }
  }
}

void gk_q4_gemv(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint32_t* sm, int64_t G, int64_t N,
                float* y, int nthreads) {
  const int nt = threads_for(N * K, nthreads);
  const int64_t NG = K / G;
  float* xs = (float*)malloc(sizeof(float) * (size_t)(M * NG + 1));
  for (int64_t m = 0; m < M; m++)
    for (int64_t g = 0; g < NG; g++) {
      float t = 0.0f;
      for (int64_t k = g * G; k < (g + 1) * G; k++) t += x[m * K + k];
      xs[m * NG + g] = t;
    }
  for (int64_t m = 0; m < M; m += 4) {
    const float* xm = x + m * K;
    const float* xsm = xs + m * NG;
    float* ym = y + m * N;
    switch (M - m >= 4 ? 4 : M - m) {
      case 1: q4_rows<1>(xm, xsm, K, w, sm, G, N, ym, nt); break;
      case 2: q4_rows<2>(xm, xsm, K, w, sm, G, N, ym, nt); break;
      case 3: q4_rows<3>(xm, xsm, K, w, sm, G, N, ym, nt); break;
      default: q4_rows<4>(xm, xsm, K, w, sm, G, N, ym, nt); break;
    }
  }
  free(xs);
}

void gk_bf16_gemv(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* y, int nthreads) {
  const int nt = threads_for(N * K, nthreads);
  for (int64_t m = 0; m < M; m += 4) {
    const float* xm = x + m * K;
    float* ym = y + m * N;
    switch (M - m >= 4 ? 4 : M - m) {
      case 1: bf_rows<1>(xm, K, w, N, ym, nt); break;
      case 2: bf_rows<2>(xm, K, w, N, ym, nt); break;
      case 3: bf_rows<3>(xm, K, w, N, ym, nt); break;
      default: bf_rows<4>(xm, K, w, N, ym, nt); break;
    }
  }
}

// out[n - r0, k] = dequant(w)[n, k] for rows r0 <= n < r1; the fp32 outputs are bitwise equal to
// the torch reference (one multiply for int8; a multiply then an add, never fused, for int4) and
// the bf16 ones are those values rounded to nearest-even, as torch's .to(torch.bfloat16) does.
void gk_q8_dequant(const int8_t* w, const float* scale, int64_t r0, int64_t r1, int64_t K, float* out,
                   int nthreads) {
  q8_dequant(w, scale, r0, r1, K, out, nthreads);
}
void gk_q8_dequant_bf16(const int8_t* w, const float* scale, int64_t r0, int64_t r1, int64_t K,
                        uint16_t* out, int nthreads) {
  q8_dequant(w, scale, r0, r1, K, out, nthreads);
}
void gk_q4_dequant(const uint8_t* w, const uint32_t* sm, int64_t r0, int64_t r1, int64_t K, int64_t G,
                   float* out, int nthreads) {
  q4_dequant(w, sm, r0, r1, K, G, out, nthreads);
}
void gk_q4_dequant_bf16(const uint8_t* w, const uint32_t* sm, int64_t r0, int64_t r1, int64_t K,
                        int64_t G, uint16_t* out, int nthreads) {
  q4_dequant(w, sm, r0, r1, K, G, out, nthreads);
}

}  // extern "C"
