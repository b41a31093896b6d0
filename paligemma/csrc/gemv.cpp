// y[M, N] = x[M, K] @ (w[N, K] * scale[N])^T for the few rows of a decode step.
//
// Decoding reads every weight once per token, so it should run at memory bandwidth. PyTorch's
// CPU kernels do for f32 weights at M = 1 only; with bf16 / f16 / int8 weights and float32
// activations (and f32 at M > 1) they are compute-bound or round x. Here each thread streams a
// contiguous range of weight rows (what the hardware prefetcher follows best, helped by software
// prefetches a few KB ahead, which also start the page walks of the next 4 KB pages early), every
// row is read from memory once and reused from L1 by up to 4 rows of x at a time, and the inner
// loops keep several independent accumulators per x row to hide the FMA latency.
//
// One source, two instruction sets, chosen by the compiler flags `paligemma.kernels` builds with
// (PG_ISA names the op): AVX-512 (F + BW + VNNI: 16 f32 lanes, vpdpwssd) or AVX2 + FMA + F16C.
//
// f32 / f16 / bf16 weights are widened to f32 lanes and accumulated in f32. int8 weights are
// multiplied as int16 pairs (vpmaddwd, or vpdpwssd with AVX-512 VNNI: twice the f32 path's
// products per instruction) against x rounded to int16 per group of 256 elements (relative
// error <= 2^-16 of the group's largest |x|, far below the int8 weights' own rounding); each
// group's int32 sums are scaled back and accumulated in f32.
//
// Packed int4 weights (uint8 [N, K / 2] in `paligemma/int4.py`'s blocks of 16 rows whose 4-byte
// words alternate; w = q * scale + offset per group of G columns) take u8 x s8 dot products
// (vpdpbusd, four per 32-bit lane) of their codes q in [0, 15], 16 weight rows across the lanes,
// with x rounded to int8 per group of G; per group
//   y[n] += scale[n, g] * xscale[g] * sum_k q[n, k] * xq[k] + offset[n, g] * xscale[g] * sum_k xq[k]
// = sum_k w[n, k] * x[k] with x rounded. `int4_dequantize` widens packed int4 weights to
// float32 for the GEMM of many rows.
//
// The AMX build (PG_ISA=amx: the AVX-512 code plus AMX-BF16 and AMX-INT8 tiles) adds
// `gemm_amx`, the GEMM of many rows (prefill, vision) for bf16, int8 and packed int4 weights.
// Weight codes are exact in bf16, and x is split into bf16 parts (three carry float32's 24
// bits: x = hi + mid + lo up to f32 rounding), so every product is exact in the tiles' f32
// accumulators; one part is bf16 x (two: `--matmul-precision high`).
// int8 and int4 weights also have `gemm_amx_int8`, on AMX-INT8 tiles: x rounded to int16 steps
// per row, as the decode kernel rounds it, split into two int8 halves whose int32 sums with the
// codes are exact: no bf16 unpacking (int4 codes are only split into bytes), and int8 tiles do
// twice the products of bf16 ones.
//
// `gelu_tanh_` (both builds) is the tanh-GELU of the MLPs, times the up projection in the same
// pass for Gemma's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#ifndef PG_ISA
#error "build with -DPG_ISA=avx2 or -DPG_ISA=avx512 (paligemma/kernels.py does)"
#endif
#define PG_STR2(x) #x
#define PG_STR(x) PG_STR2(x)
#define PG_CAT2(a, b) a##b
#define PG_CAT(a, b) PG_CAT2(a, b)

namespace {

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

// The data of `op`'s optional argument `name`, checked to be n contiguous float32 values
// (scales, biases); nullptr without it.
const float* float_values(const char* op, const char* name, const std::optional<at::Tensor>& t,
                          int64_t n) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n, op, ": ",
              name, " must be contiguous float32 [", n, "]");
  return t->data_ptr<float>();
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// ---- AVX-512: 16 f32 lanes; int8 steps of 32 weights as one vector of 32 int16.
using vf = __m512;
using vi = __m512i;
constexpr int kLanes = 16;
inline vf zero() { return _mm512_setzero_ps(); }
inline vf load(const float* p) { return _mm512_loadu_ps(p); }
inline vf fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf set1(float v) { return _mm512_set1_ps(v); }
inline float hsum(vf v) { return _mm512_reduce_add_ps(v); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf select_below(vf x, float limit, vf a, vf b) {  // a where x < limit, else b
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, set1(limit), _CMP_LT_OQ), b, a);
}
inline float hmax(vf v) { return _mm512_reduce_max_ps(v); }
inline vf widen(const float* p) { return load(p); }
inline vf widen(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline vf widen(const at::BFloat16* p) {  // a bf16 is the top half of an f32
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline void store(at::BFloat16* p, vf v) {  // rounded to nearest even as c10::BFloat16, NaN kept
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF));
  __m512i top = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  top = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), top,
                                _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(top));
}
inline vi izero() { return _mm512_setzero_si512(); }
inline vi load_i16(const int16_t* p) { return _mm512_loadu_si512(p); }
inline vi widen_i8(const int8_t* p) {  // 32 int8 -> 32 int16
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline vi dot_i16(vi acc, vi a, vi b) {  // acc[j] += a[2j] b[2j] + a[2j+1] b[2j+1]
#ifdef __AVX512VNNI__
  return _mm512_dpwssd_epi32(acc, a, b);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}
inline vi dot_u8(vi acc, vi a, vi b) {  // acc[j] += sum_t a[4j + t] b[4j + t], a u8, b s8
#ifdef __AVX512VNNI__
  return _mm512_dpbusd_epi32(acc, a, b);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(a, b), _mm512_set1_epi16(1)));
#endif
}
inline vi set1_i8(int8_t v) { return _mm512_set1_epi8(v); }
inline vi iadd(vi a, vi b) { return _mm512_add_epi32(a, b); }
inline vi and_i(vi a, vi b) { return _mm512_and_si512(a, b); }
template <int S> inline vi srli_i16(vi v) { return S ? _mm512_srli_epi16(v, S) : v; }
inline vf to_float(vi v) { return _mm512_cvtepi32_ps(v); }
inline void store(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf div(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf round_nearest(vf v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT); }
inline vf clamp(vf v, float lo, float hi) {
  return _mm512_min_ps(_mm512_max_ps(v, set1(lo)), set1(hi));
}
inline vf times_pow2(vf p, vf n) { return _mm512_scalef_ps(p, n); }  // p * 2^n, n integral
inline vi set1_i32(int32_t v) { return _mm512_set1_epi32(v); }
inline vf widen_u8(const uint8_t* p) {  // kLanes bytes -> f32
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
}
constexpr int kI16Lanes = 32;
constexpr int kRowBlock = 4;  // weight rows per block: 4 x 4 accumulators of 32 registers
// Software prefetch distance along the weight stream (bytes), for float and int8 / int4 weights.
constexpr int64_t kPrefetchFloat = 2048, kPrefetchInt8 = 2048;
constexpr bool kPrefetchNextBlock = true;  // see `prefetch_ahead`
constexpr int64_t kRunBytes = 4096;  // see `Rows`
#else
// ---- AVX2 + FMA + F16C: 8 f32 lanes; int8 steps of 16 weights.
using vf = __m256;
using vi = __m256i;
constexpr int kLanes = 8;
inline vf zero() { return _mm256_setzero_ps(); }
inline vf load(const float* p) { return _mm256_loadu_ps(p); }
inline vf fmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf add(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf set1(float v) { return _mm256_set1_ps(v); }
inline float hsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf select_below(vf x, float limit, vf a, vf b) {  // a where x < limit, else b
  return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, set1(limit), _CMP_LT_OQ));
}
inline float hmax(vf v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
inline vf widen(const float* p) { return load(p); }
inline vf widen(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline vf widen(const at::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline void store(at::BFloat16* p, vf v) {  // rounded to nearest even as c10::BFloat16, NaN kept
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF));
  __m256i top = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
  top = _mm256_blendv_epi8(top, _mm256_set1_epi32(0x7FC0),
                           _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  // 32-bit lanes to 16-bit: packus works within 128-bit halves; the permute joins them
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(top, top), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
inline vi izero() { return _mm256_setzero_si256(); }
inline vi load_i16(const int16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline vi widen_i8(const int8_t* p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline vi dot_i16(vi acc, vi a, vi b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
inline vi dot_u8(vi acc, vi a, vi b) {  // acc[j] += sum_t a[4j + t] b[4j + t], a u8, b s8
  // a pair's two products (<= 15 * 127 each for int4 codes) never saturate the int16 sum
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
}
inline vi set1_i8(int8_t v) { return _mm256_set1_epi8(v); }
inline vi iadd(vi a, vi b) { return _mm256_add_epi32(a, b); }
inline vi and_i(vi a, vi b) { return _mm256_and_si256(a, b); }
template <int S> inline vi srli_i16(vi v) { return S ? _mm256_srli_epi16(v, S) : v; }
inline vf to_float(vi v) { return _mm256_cvtepi32_ps(v); }
inline void store(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf div(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf round_nearest(vf v) {
  return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline vf clamp(vf v, float lo, float hi) {
  return _mm256_min_ps(_mm256_max_ps(v, set1(lo)), set1(hi));
}
inline vf times_pow2(vf p, vf n) {  // p * 2^n, n integral in [-126, 127]: the exponent field
  const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  const __m256i e = _mm256_slli_epi32(biased, 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
inline vi set1_i32(int32_t v) { return _mm256_set1_epi32(v); }
inline vf widen_u8(const uint8_t* p) {  // kLanes bytes -> f32
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
}
constexpr int kI16Lanes = 16;
constexpr int kRowBlock = 2;  // weight rows per block: 4 x 2 accumulators of 16 registers
// 4 KB for float weights: measured on an AVX2-only EPYC (`benchmarks/RESULTS.md`), decode of the
// bf16 3B model 19% faster than with 2 KB; int8 was 7% slower with 4 KB, so it keeps 2 KB.
constexpr int64_t kPrefetchFloat = 4096, kPrefetchInt8 = 2048;
constexpr bool kPrefetchNextBlock = false;  // see `prefetch_ahead`
constexpr int64_t kRunBytes = 0;  // see `Rows`: not measured on an AVX2 CPU
#endif

// Where the rows of one block of weight rows lie (`for_blocks`). Block row r is weight row
// n + r * spread: its bytes start spread * r rows after the block's first, its output and its
// scales are those of that row. Each block row is one stream of reads, and a stream reads a run
// of `spread` consecutive rows, one per block, before it moves on to its next run, (NR - 1)
// runs further: rows shorter than kRunBytes (a page) are read a page at a time per stream.
// The hardware prefetcher follows one ascending stream per page; with two streams in one page
// (2 KB rows: int8 at K = 2048, bf16 at K = 1024) the weights streamed 20-25% slower
// (benchmarks/RESULTS.md).
struct Rows {
  int64_t spread;  // weight rows from one block row to the next
  int64_t before;  // bytes of this row's run before it
  int64_t run;     // bytes of a stream's run (spread rows)
  int64_t skip;    // bytes from the end of a stream's run to the start of its next one
};

// Prefetches the line `dist` bytes past byte `pos` of `row`. With kPrefetchNextBlock a stream
// that passes the end of its run continues into its next run, which is what this thread reads
// next; without, into the rows after it, which other streams are already reading, so that the
// next block's rows start cold. AVX-512 build, one decode step of the 3B model: 14-25% faster
// with it (bf16, int8, int4; batch 1 and 4). The AVX2 build keeps the prefetch tuned on an
// AVX2 CPU: run on the AVX-512 Xeon it gained for bf16 and lost for int8, by no more than two
// identical builds differed there (benchmarks/RESULTS.md).
inline void prefetch_ahead(const void* row, int64_t pos, int64_t dist, const Rows& rows) {
  const bool next_run = kPrefetchNextBlock && rows.before + pos + dist >= rows.run;
  prefetch(static_cast<const char*>(row) + pos + dist + (next_run ? rows.skip : 0));
}

// Float weights: NR weight rows (`Rows`) against XR rows of x (row stride K), one 64-byte
// line of each weight row per step. Each x vector is loaded once per step and used NR times,
// each weight vector widened once and used XR times: at XR = 4 the loads per FMA stay low
// enough that a decode step at batch 4 still runs at memory bandwidth, not at load-port speed.
template <typename W, int XR, int NR>
inline void dot_rows(const float* x, const W* w, int64_t K, const Rows& rows, const float* scale,
                     float* y, int64_t N) {
  const int64_t ldw = rows.spread * K;
  constexpr int64_t kStep = 64 / sizeof(W);  // one cache line of weights
  constexpr int kVectors = kStep / kLanes;
  // A accumulators per (x row, weight row): at least 8 independent FMA chains in flight.
  constexpr int A = std::max(1, std::min(kVectors, 8 / (XR * NR)));
  vf acc[XR][NR][A];
  for (int i = 0; i < XR; ++i)
    for (int r = 0; r < NR; ++r)
      for (int a = 0; a < A; ++a) acc[i][r][a] = zero();
  int64_t k = 0;
  for (; k + kStep <= K; k += kStep) {
    for (int r = 0; r < NR; ++r) prefetch_ahead(w + r * ldw, k * sizeof(W), kPrefetchFloat, rows);
    for (int v = 0; v < kVectors; ++v) {
      vf wv[NR];
      for (int r = 0; r < NR; ++r) wv[r] = widen(w + r * ldw + k + v * kLanes);
      for (int i = 0; i < XR; ++i) {
        const vf xv = load(x + i * K + k + v * kLanes);
        for (int r = 0; r < NR; ++r) acc[i][r][v % A] = fmadd(xv, wv[r], acc[i][r][v % A]);
      }
    }
  }
  for (; k + kLanes <= K; k += kLanes) {
    for (int i = 0; i < XR; ++i) {
      const vf xv = load(x + i * K + k);
      for (int r = 0; r < NR; ++r) acc[i][r][0] = fmadd(xv, widen(w + r * ldw + k), acc[i][r][0]);
    }
  }
  for (int i = 0; i < XR; ++i) {
    for (int r = 0; r < NR; ++r) {
      vf sum = acc[i][r][0];
      for (int a = 1; a < A; ++a) sum = add(sum, acc[i][r][a]);
      float s = hsum(sum);
      for (int64_t kk = k; kk < K; ++kk) s += x[i * K + kk] * static_cast<float>(w[r * ldw + kk]);
      y[i * N + r * rows.spread] = scale ? s * scale[r * rows.spread] : s;
    }
  }
}

constexpr int64_t kGroup = 256;  // int16 rounding group of x (multiple of 2 * kI16Lanes)
constexpr int64_t kI8Step = 2 * kI16Lanes;  // int8 weights per step: two int16 vectors

// x rows rounded per group to integer steps of the group's largest |x| / levels (32767: int16 for
// int8 weights; 127: int8 for int4 weights): x ~ q * group_scale; and each group's sum of the
// rounded x, group_scale * sum(q) (int4's offsets meet it: the products are then those of the
// dequantized weights and the rounded x, whose error is |w| times x's, not |q * scale|'s).
struct QuantizedRows {
  std::vector<int16_t> q;     // [M, K]
  std::vector<float> scales;  // [M, groups]
  std::vector<float> sums;    // [M, groups]: of the rounded x
  int64_t groups;
};

QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K, int64_t group, float levels) {
  const int64_t groups = (K + group - 1) / group;
  QuantizedRows r{std::vector<int16_t>(M * K), std::vector<float>(M * groups),
                  std::vector<float>(M * groups), groups};
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < r.groups; ++g) {
      const int64_t begin = g * group, end = std::min(K, begin + group);
      float amax = 0.0f;
      bool nan = false;
      for (int64_t k = begin; k < end; ++k)
        amax = std::max(amax, std::abs(x[m * K + k])), nan |= std::isnan(x[m * K + k]);
      // a NaN makes the group's scale and sum NaN, so that it reaches every output of its row
      const float scale = r.scales[m * r.groups + g] =
          nan ? std::numeric_limits<float>::quiet_NaN() : amax > 0.0f ? amax / levels : 1.0f;
      // x * (levels / amax) rounded to nearest (even): within one f32 ulp of x / scale, so a
      // tie may round the other way; clamped to +-levels against that ulp.
      const float inv = amax > 0.0f && !nan ? levels / amax : 0.0f;
      int64_t units = 0;  // exact: at most 256 * 32767
      for (int64_t k = begin; k < end; ++k) {
        const auto q = static_cast<int16_t>(
            std::max(-levels, std::min(levels, std::nearbyint(x[m * K + k] * inv))));
        r.q[m * K + k] = q;
        units += q;
      }
      r.sums[m * r.groups + g] = scale * static_cast<float>(units);
    }
  }
  return r;
}

// int8 weights: NR weight rows against XR rows of x, kI8Step weights per step as two vectors of
// int16, pair dot products into one int32 sum per (x row, weight row), which a group never lets
// overflow: each int32 lane adds 256 / kI8Step * 4 products of at most 127 * 32767, < 2^31.
template <int XR, int NR>
inline void dot_rows_int8(const QuantizedRows& xq, const float* x, int64_t row0, const int8_t* w,
                          int64_t K, const Rows& rows, const float* scale, float* y, int64_t N) {
  const int64_t ldw = rows.spread * K;
  vf acc[XR][NR];
  for (int i = 0; i < XR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = zero();
  const int64_t body = K / kI8Step * kI8Step;
  for (int64_t g = 0; g * kGroup < body; ++g) {
    vi sum[XR][NR];
    for (int i = 0; i < XR; ++i)
      for (int r = 0; r < NR; ++r) sum[i][r] = izero();
    const int64_t end = std::min(body, (g + 1) * kGroup);
    for (int64_t k = g * kGroup; k < end; k += kI8Step) {
      for (int half = 0; half < 2; ++half) {
        vi wv[NR];
        for (int r = 0; r < NR; ++r) {
          if (half == 0) prefetch_ahead(w + r * ldw, k, kPrefetchInt8, rows);
          wv[r] = widen_i8(w + r * ldw + k + half * kI16Lanes);
        }
        for (int i = 0; i < XR; ++i) {
          const vi xv = load_i16(xq.q.data() + (row0 + i) * K + k + half * kI16Lanes);
          for (int r = 0; r < NR; ++r) sum[i][r] = dot_i16(sum[i][r], wv[r], xv);
        }
      }
    }
    for (int i = 0; i < XR; ++i) {
      const vf s = set1(xq.scales[(row0 + i) * xq.groups + g]);
      for (int r = 0; r < NR; ++r) acc[i][r] = fmadd(to_float(sum[i][r]), s, acc[i][r]);
    }
  }
  for (int i = 0; i < XR; ++i) {
    for (int r = 0; r < NR; ++r) {
      float s = hsum(acc[i][r]);
      for (int64_t kk = body; kk < K; ++kk)
        s += x[(row0 + i) * K + kk] * static_cast<float>(w[r * ldw + kk]);
      y[i * N + r * rows.spread] = s * scale[r * rows.spread];
    }
  }
}

// ---- int4 (`paligemma/int4.py`'s layout): weight rows in blocks of 16, the 16 rows' 4-byte words
// side by side: word c of a block (64 bytes) holds columns 8c .. 8c + 7 of each row, row r in
// bytes 4r .. 4r + 3, byte j column 8c + 2j in its low nibble and 8c + 2j + 1 in its high one.
// One mask (low nibbles) or one shift and one mask (high nibbles) give every 32-bit lane the four
// codes of one weight row, as bytes, that meet x's four bytes (x[8c], x[8c + 2], x[8c + 4],
// x[8c + 6]) or (x[8c + 1], ..., x[8c + 7]), broadcast, in one u8 x s8 dot product (vpdpbusd):
// the lanes hold 16 weight rows, and each group's int32 sums need no adding across lanes (the
// row-major layout's sums across lanes took about a quarter of a decode step at 4 rows of x).
// x is rounded to int8 per group for this (`quantize_rows`, 127 levels): half the dot products
// of int16 pairs, which bounded a step at 4 rows of x (benchmarks/RESULTS.md), for a rounding of
// x (at most 1/254 of its group's largest |x|) whose rms error in the products was 6-15x below
// that of the int4 codes (Gaussian, Student-t and outlier-laden x, 2048 x 2048 at G = 128).
constexpr int64_t kI4BlockRows = 16;
constexpr int64_t kI4WordBytes = 64;                // one word of a block: 16 rows x 4 bytes
constexpr int kI4Vectors = kI4BlockRows / kLanes;  // vectors per word of a block

// Block b of a packed int4 matrix of K columns (w [N, K / 2], s [N, K / G, 2]): its 16 rows'
// bytes, and the 16 scales, then 16 offsets, of its group g.
inline const uint8_t* int4_block(const uint8_t* w, int64_t b, int64_t K) {
  return w + b * kI4BlockRows * K / 2;
}
inline const float* int4_group_scales(const float* s, int64_t b, int64_t groups, int64_t g) {
  return s + (b * groups + g) * 2 * kI4BlockRows;
}
// Independent int32 sums per group (all rows of x together), enough to hide the dot products'
// latency (benchmarks/RESULTS.md). AVX2's 16 registers must also hold the accumulators and
// words: 2 rows of x at most.
#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr int kI4Chains = 8;
constexpr int kI4MaxXRows = 4;  // x rows per pass over a block
#else
constexpr int kI4Chains = 4;
constexpr int kI4MaxXRows = 2;
#endif

// x rows rounded to int8 (`quantize_rows`, 127 levels) as the int32 quads the words' nibbles
// meet: per 8 columns, the even columns' bytes (x0, x2, x4, x6), then the odd ones'.
std::vector<int32_t> int4_quads(const std::vector<int16_t>& q) {
  std::vector<int32_t> quads(q.size() / 4);
  for (size_t k0 = 0; k0 < q.size(); k0 += 8)
    for (int odd = 0; odd < 2; ++odd) {
      uint32_t quad = 0;
      for (int t = 0; t < 4; ++t)
        quad |= static_cast<uint32_t>(static_cast<uint8_t>(q[k0 + 2 * t + odd])) << (8 * t);
      quads[k0 / 4 + odd] = static_cast<int32_t>(quad);
    }
  return quads;
}

// The low (ODD = 0) or high (ODD = 1) nibbles of a word's vectors against XR rows of x's quads
// `xq` (row stride `ldx` quads): into chain (U * 2 + ODD) % A of each (x row, vector).
template <int ODD, int U, int XR, int A>
inline void int4_products(const vi (&words)[kI4Vectors], const int32_t* xq, int64_t ldx,
                          vi (&sum)[XR][kI4Vectors][A]) {
  vi codes[kI4Vectors];
  for (int h = 0; h < kI4Vectors; ++h)
    codes[h] = and_i(ODD ? srli_i16<4>(words[h]) : words[h], set1_i8(0x0F));
  for (int i = 0; i < XR; ++i) {
    const vi xv = set1_i32(xq[i * ldx + ODD]);
    for (int h = 0; h < kI4Vectors; ++h)
      sum[i][h][(U * 2 + ODD) % A] = dot_u8(sum[i][h][(U * 2 + ODD) % A], codes[h], xv);
  }
}

// One block of 16 packed int4 rows (`w`: K / 2 * 16 bytes; `s`: its scales [K / G][2][16]) against
// XR rows of x from row0 -> y[i * N + r]. Per group g: y[i, r] += scale[r, g] * xscale[i, g] *
// sum_k q[r, k] * xq[i, k] + offset[r, g] * xsum[i, g]. A group's chains together add G products
// of a code (<= 15) and an int8 step of x (<= 127) per lane: far below 2^31.
template <int XR>
inline void dot_block_int4(const QuantizedRows& xq, const std::vector<int32_t>& quads,
                           int64_t row0, const uint8_t* w, int64_t K, int64_t G, const float* s,
                           float* y, int64_t N) {
  constexpr int A = std::max(1, kI4Chains / (XR * kI4Vectors));  // per (x row, vector)
  constexpr int U = (A + 1) / 2;  // words per step: a word's 2 nibbles feed 2 chains
  static_assert(U == 1 || U == 2 || U == 4, "a group's words (G / 8, G % 32 == 0) are whole steps");
  const int64_t groups = K / G, words = G / 8;
  const int32_t* xp = quads.data() + row0 * (K / 4);
  vf acc[XR][kI4Vectors];
  for (int i = 0; i < XR; ++i)
    for (int h = 0; h < kI4Vectors; ++h) acc[i][h] = zero();
  for (int64_t g = 0; g < groups; ++g) {
    vi sum[XR][kI4Vectors][A];
    for (int i = 0; i < XR; ++i)
      for (int h = 0; h < kI4Vectors; ++h)
        for (int a = 0; a < A; ++a) sum[i][h][a] = izero();
    const uint8_t* wg = w + g * words * kI4WordBytes;
    const int32_t* xg = xp + g * G / 4;
    auto word = [&](int64_t c, auto u) {
      constexpr int kU = decltype(u)::value;
      const uint8_t* wc = wg + (c + kU) * kI4WordBytes;
      prefetch(wc + kPrefetchInt8);
      vi v[kI4Vectors];
      for (int h = 0; h < kI4Vectors; ++h)
        v[h] = load_i16(reinterpret_cast<const int16_t*>(wc + h * kLanes * 4));
      const int32_t* xc = xg + (c + kU) * 2;
      int4_products<0, kU, XR, A>(v, xc, K / 4, sum);
      int4_products<1, kU, XR, A>(v, xc, K / 4, sum);
    };
    for (int64_t c = 0; c < words; c += U) {
      word(c, std::integral_constant<int, 0>{});
      if constexpr (U > 1) word(c, std::integral_constant<int, 1>{});
      if constexpr (U > 2) {
        word(c, std::integral_constant<int, 2>{});
        word(c, std::integral_constant<int, 3>{});
      }
    }
    const float* sg = int4_group_scales(s, 0, groups, g);
    for (int i = 0; i < XR; ++i) {
      const vf xscale = set1(xq.scales[(row0 + i) * groups + g]);
      const vf xsum = set1(xq.sums[(row0 + i) * groups + g]);
      for (int h = 0; h < kI4Vectors; ++h) {
        vi total = sum[i][h][0];
        for (int a = 1; a < A; ++a) total = iadd(total, sum[i][h][a]);
        const vf scale = mul(load(sg + h * kLanes), xscale);
        acc[i][h] = fmadd(to_float(total), scale, acc[i][h]);
        acc[i][h] = fmadd(load(sg + kI4BlockRows + h * kLanes), xsum, acc[i][h]);
      }
    }
  }
  for (int i = 0; i < XR; ++i)
    for (int h = 0; h < kI4Vectors; ++h) store(y + i * N + h * kLanes, acc[i][h]);
}

// Weight rows [begin, end) of `row_bytes` each in blocks of kRowBlock rows (then single rows),
// and for each block the rows of x in blocks of 4, 2, 1: `block(NR, n, rows, XR, m)` handles
// the weight rows n + r * rows.spread (r < NR) against x rows [m, m + XR). A block's weight
// lines stay in L1 while the next x rows use them. Rows shorter than `run_bytes` are spread
// (`Rows`): kRowBlock * spread rows at a time, spread blocks of kRowBlock rows each.
template <typename Block>
inline void for_blocks(int64_t begin, int64_t end, int64_t M, int64_t row_bytes,
                       const Block& block, int64_t run_bytes = kRunBytes) {
  auto x_blocks = [&](auto nr, int64_t n, const Rows& rows) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) block(nr, n, rows, std::integral_constant<int, 4>{}, m);
    if (m + 2 <= M) block(nr, n, rows, std::integral_constant<int, 2>{}, m), m += 2;
    if (m < M) block(nr, n, rows, std::integral_constant<int, 1>{}, m);
  };
  constexpr std::integral_constant<int, kRowBlock> kBlock;
  const bool short_rows = row_bytes > 0 && row_bytes < run_bytes && run_bytes % row_bytes == 0;
  const int64_t spread = short_rows ? run_bytes / row_bytes : 1;
  const int64_t run = spread * row_bytes;
  int64_t n = begin;
  for (; spread > 1 && n + kRowBlock * spread <= end; n += kRowBlock * spread)
    for (int64_t j = 0; j < spread; ++j)
      x_blocks(kBlock, n + j, Rows{spread, j * row_bytes, run, (kRowBlock - 1) * run});
  for (; n + kRowBlock <= end; n += kRowBlock)
    x_blocks(kBlock, n, Rows{1, 0, row_bytes, (kRowBlock - 1) * row_bytes});
  for (; n < end; ++n) x_blocks(std::integral_constant<int, 1>{}, n, Rows{1, 0, row_bytes, 0});
}

// Each thread takes a contiguous range of weight rows: kRowBlock sequential streams per thread.
template <typename W>
void gemv_kernel(const float* x, int64_t M, const W* w, const float* scale, int64_t N,
                 int64_t K, float* y) {
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for_blocks(begin, end, M, K * sizeof(W), [&](auto nr, int64_t n, const Rows& rows, auto xr,
                                                 int64_t m) {
      dot_rows<W, decltype(xr)::value, decltype(nr)::value>(
          x + m * K, w + n * K, K, rows, scale ? scale + n : nullptr, y + m * N + n, N);
    });
  });
}

void gemv_kernel_int8(const float* x, int64_t M, const int8_t* w, const float* scale, int64_t N,
                      int64_t K, float* y) {
  TORCH_CHECK(scale != nullptr, "gemv: int8 weights need their float32 scale");
  const QuantizedRows xq = quantize_rows(x, M, K, kGroup, 32767.0f);
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for_blocks(begin, end, M, K, [&](auto nr, int64_t n, const Rows& rows, auto xr, int64_t m) {
      dot_rows_int8<decltype(xr)::value, decltype(nr)::value>(xq, x, m, w + n * K, K, rows,
                                                              scale + n, y + m * N + n, N);
    });
  });
}

// x [M, K], packed w [N, K / 2], s [N, K / G, 2] (`int4_group` checked them; rows in blocks of
// 16) -> y [M, N]. Each thread takes a range of blocks, one stream of reads, and every block meets
// the rows of x kI4MaxXRows at a time while its bytes are in L1 / L2.
void gemv_kernel_int4(const float* x, int64_t M, const uint8_t* w, const float* s, int64_t N,
                      int64_t K, int64_t G, float* y) {
  const QuantizedRows xq = quantize_rows(x, M, K, G, 127.0f);
  const std::vector<int32_t> quads = int4_quads(xq.q);
  at::parallel_for(0, N / kI4BlockRows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      auto pass = [&](auto xr, int64_t m) {
        dot_block_int4<decltype(xr)::value>(xq, quads, m, int4_block(w, b, K), K, G,
                                            int4_group_scales(s, b, K / G, 0),
                                            y + m * N + b * kI4BlockRows, N);
      };
      int64_t m = 0;
      for (; m + kI4MaxXRows <= M; m += kI4MaxXRows)
        pass(std::integral_constant<int, kI4MaxXRows>{}, m);
      if (m + 2 <= M) pass(std::integral_constant<int, 2>{}, m), m += 2;
      if (m < M) pass(std::integral_constant<int, 1>{}, m);
    }
  });
}

// Checks packed int4 weights w [N, K / 2] and their scales s [N, K / G, 2]; returns G.
int64_t int4_group(const at::Tensor& w, const at::Tensor& s, const char* op) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(), op,
              ": packed int4 w must be contiguous uint8 [N, K / 2]");
  TORCH_CHECK(s.dim() == 3 && s.scalar_type() == at::kFloat && s.is_contiguous() &&
                  s.size(0) == w.size(0) && s.size(2) == 2,
              op, ": int4 scales must be contiguous float32 [N, K / G, 2]");
  TORCH_CHECK(w.size(0) % kI4BlockRows == 0, op, ": packed int4 rows come in blocks of ",
              kI4BlockRows, ", got N = ", w.size(0));
  const int64_t K = 2 * w.size(1), G = s.size(1) > 0 ? K / s.size(1) : 0;
  TORCH_CHECK(G > 0 && G * s.size(1) == K && G % 32 == 0 && G <= 256, op,
              ": int4 group size K / s.size(1) must be a multiple of 32, at most 256");
  return G;
}

at::Tensor gemv_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s) {
  const int64_t G = int4_group(w, s, "gemv");
  TORCH_CHECK(x.size(1) == 2 * w.size(1), "gemv: int4 w must be [N, K / 2] with K = x.size(1)");
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  gemv_kernel_int4(x.data_ptr<float>(), M, w.data_ptr<uint8_t>(), s.data_ptr<float>(), N, K, G,
                   y.data_ptr<float>());
  return y;
}

// Columns [k0, k0 + cols) (multiples of 8) of the 16 rows of a packed int4 block (`block`: its
// first byte) as one code per byte, row r at out + r * ld: per 16 bytes (4 rows' words), low and
// high nibbles interleaved give each row's 8 columns in order.
inline void int4_block_codes(const uint8_t* block, int64_t k0, int64_t cols, uint8_t* out,
                             int64_t ld) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (int64_t c = 0; c < cols / 8; ++c) {
    const uint8_t* word = block + (k0 / 8 + c) * kI4WordBytes;
    for (int q = 0; q < 4; ++q) {  // rows 4q .. 4q + 3
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(word + 16 * q));
      const __m128i low = _mm_and_si128(b, mask);
      const __m128i high = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
      const __m128i r01 = _mm_unpacklo_epi8(low, high), r23 = _mm_unpackhi_epi8(low, high);
      uint8_t* o = out + 4 * q * ld + 8 * c;
      _mm_storel_epi64(reinterpret_cast<__m128i*>(o), r01);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(o + ld), _mm_unpackhi_epi64(r01, r01));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(o + 2 * ld), r23);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(o + 3 * ld), _mm_unpackhi_epi64(r23, r23));
    }
  }
}

// Packed int4 w [N, K / 2], s [N, K / G, 2] -> out [N, K] float32, q * scale + offset (written in
// place): the GEMM of many rows dequantizes a few MB of rows at a time (`int4.py`). A block's
// codes go through L1 one group at a time.
void int4_dequantize(const at::Tensor& w, const at::Tensor& s, at::Tensor out) {
  const int64_t G = int4_group(w, s, "int4_dequantize");
  const int64_t N = w.size(0), K = 2 * w.size(1);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 &&
                  out.size(0) == N && out.size(1) == K,
              "int4_dequantize: out must be contiguous float32 [N, K]");
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N / kI4BlockRows, 1, [&](int64_t begin, int64_t end) {
    alignas(64) uint8_t codes[kI4BlockRows][256];  // one group: G <= 256
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t g = 0; g < K / G; ++g) {
        int4_block_codes(int4_block(wp, b, K), g * G, G, codes[0], 256);
        const float* sg = int4_group_scales(sp, b, K / G, g);
        for (int64_t r = 0; r < kI4BlockRows; ++r) {
          const vf scale = set1(sg[r]), offset = set1(sg[kI4BlockRows + r]);
          float* o = op + (b * kI4BlockRows + r) * K + g * G;
          for (int64_t k = 0; k < G; k += kLanes)
            store(o + k, fmadd(widen_u8(codes[r] + k), scale, offset));
        }
      }
    }
  });
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// The int16 step of a row of x for int8 weights on "amx-int8" and "int8-gemm": its largest |x|
// / 32639 (X_INT16_LEVELS: the high int8 half stays within int8), at least the smallest normal
// float; NaN if the row holds a NaN.
inline float int16_step(const float* xr, int64_t K) {
  __m512 largest = _mm512_setzero_ps();
  __mmask16 nan = 0;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 v = _mm512_loadu_ps(xr + k);
    largest = _mm512_max_ps(largest, _mm512_abs_ps(v));
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  float amax = _mm512_reduce_max_ps(largest);
  bool has_nan = nan != 0;
  for (; k < K; ++k) amax = std::max(amax, std::abs(xr[k])), has_nan |= std::isnan(xr[k]);
  return has_nan ? NAN : std::max(amax / 32639.0f, std::numeric_limits<float>::min());
}
#endif

#if defined(__AMX_BF16__) && defined(__AMX_INT8__) && defined(__AMX_TILE__)
#include <sys/syscall.h>
#include <unistd.h>

constexpr int kMaxParts = 3;        // bf16 parts of an f32 x value (hi + mid + lo: 24 bits)
constexpr int64_t kTileK = 32;      // bf16 columns per tile row (64 bytes)
constexpr int64_t kTileK8 = 64;     // int8 columns per tile row
constexpr int64_t kChunkK = 2048;   // columns per pass: a pass's x parts stay in L2/L3
// x rows of three parts split at a time: bounds their memory (6 MB), and every weight is read
// once per chunk, so a prefill's 262 rows take one chunk (two chunks of 256: 20% slower at
// 262 x 2048 -> 16384; the 1000-row case 6% slower).
constexpr int64_t kChunkM = 512;
// bf16 weights per block, reused from L2 by every x row. With one part of x, the products of a
// block take little longer than reading it from memory: smaller blocks, the next one fetched
// while this one is multiplied (262 x 2048 x 16384: 10.5 vs 13 ms, oneDNN's bf16 GEMM 10.6);
// with three, larger blocks without (24.5 vs 26 ms).
constexpr int64_t kBlockBytes = 1 << 20, kBlockBytesOnePart = 256 << 10;

bool amx_permitted() {  // Linux grants the tile data state only on request, once per process
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                 18 /* XFEATURE_XTILEDATA */) == 0;
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: f32 sums of 2 x 2 blocks of 16 weight rows x 16 rows of x; 4-5: weights (16 rows x
// 32 columns); 6-7: x parts (16 column pairs x 16 rows x 2, the "VNNI" layout tdpbf16ps reads).
void configure_tiles() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) c.rows[t] = 16, c.colsb[t] = 64;
  _tile_loadconfig(&c);
}

// 16 floats v -> v rounded to bf16 (to nearest even) as 16 uint16, and v -= the rounded value.
inline __m256i take_bf16(__m512& v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  const __m512i r = _mm512_and_si512(up, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  v = _mm512_sub_ps(v, _mm512_castsi512_ps(r));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) { return widen(p); }

// 16 int32 holding small integers -> 16 bf16 (exact: |v| < 2^8 fits a bf16 significand).
inline __m256i int_to_bf16(__m512i v) {
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(_mm512_cvtepi32_ps(v)), 16));
}

// x [M, K] (row stride ldx, M <= kChunkM; f32, or bf16 with one part) -> bf16 parts as B tiles
// in `parts`: tile (part s, x block b of 16 rows, column step c) at ((s * XB + b) * KB + c) * 512
// uint16, its row p holding columns 2p, 2p + 1 of the block's 16 x rows (rows past M: 0).
template <typename X>
void split_x(const X* x, int64_t ldx, int64_t M, int64_t K, int64_t XB, int n_parts,
             uint16_t* parts) {
  const int64_t KB = K / kTileK;
  at::parallel_for(0, XB, 1, [&](int64_t b0, int64_t b1) {
    alignas(64) uint32_t pairs[kMaxParts][16][16];  // [part][x row][column pair]
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t rows = std::clamp<int64_t>(M - b * 16, 0, 16);
      std::memset(pairs, 0, sizeof(pairs));
      for (int64_t c = 0; c < KB; ++c) {
        for (int64_t r = 0; r < rows; ++r) {
          const X* xr = x + (b * 16 + r) * ldx + c * kTileK;
          __m512 lo = load16(xr), hi = load16(xr + 16);
          for (int s = 0; s < n_parts; ++s) {
            const __m256i a = take_bf16(lo), h = take_bf16(hi);
            _mm512_store_si512(pairs[s][r], _mm512_inserti64x4(_mm512_castsi256_si512(a), h, 1));
          }
        }
        for (int s = 0; s < n_parts; ++s) {
          uint32_t* tile = reinterpret_cast<uint32_t*>(parts + ((s * XB + b) * KB + c) * 512);
          for (int64_t p = 0; p < kTileK / 2; ++p)
            for (int64_t r = 0; r < 16; ++r) tile[p * 16 + r] = pairs[s][r][p];
        }
      }
    }
  });
}

// x [M, K] f32 (row stride ldx, M <= kChunkM * kMaxParts) -> the int8 halves of its int16
// units as B tiles of AMX-INT8 in `parts`: x[m, k] = step[m] * (256 hi + lo), hi and lo in
// [-128, 127] (`layers._int8_mm`'s rounding); tile (16-row x block j, half s, column step c) at
// ((2 j + s) * KB + c) * 512 uint16, its row p holding columns 4p .. 4p + 3 of the block's 16 x
// rows (rows past M: 0). x block j's halves are tiles 2j and 2j + 1: a pair, as tile_products
// takes x blocks.
void split_x_int8(const float* x, int64_t ldx, int64_t M, int64_t K, const float* step,
                  uint16_t* parts) {
  const int64_t KB = K / kTileK8, blocks = (M + 15) / 16;
  at::parallel_for(0, blocks, 1, [&](int64_t j0, int64_t j1) {
    alignas(64) uint32_t halves[2][16][16];  // [hi / lo][x row][4 columns]
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t rows = std::min<int64_t>(M - j * 16, 16);
      std::memset(halves, 0, sizeof(halves));
      for (int64_t c = 0; c < KB; ++c) {
        for (int64_t r = 0; r < rows; ++r) {
          const float* xr = x + (j * 16 + r) * ldx + c * kTileK8;
          const __m512 unit = _mm512_set1_ps(step[j * 16 + r]);
          for (int q = 0; q < 4; ++q) {  // x / step rounded to nearest even, as torch.round
            const __m512i units = _mm512_cvtps_epi32(_mm512_div_ps(load16(xr + 16 * q), unit));
            const __m512i hi =
                _mm512_srai_epi32(_mm512_add_epi32(units, _mm512_set1_epi32(128)), 8);
            const __m512i lo = _mm512_sub_epi32(units, _mm512_slli_epi32(hi, 8));
            _mm_store_si128(reinterpret_cast<__m128i*>(&halves[0][r][4 * q]),
                            _mm512_cvtepi32_epi8(hi));
            _mm_store_si128(reinterpret_cast<__m128i*>(&halves[1][r][4 * q]),
                            _mm512_cvtepi32_epi8(lo));
          }
        }
        for (int s = 0; s < 2; ++s) {
          uint32_t* tile = reinterpret_cast<uint32_t*>(parts + ((2 * j + s) * KB + c) * 512);
          for (int64_t p = 0; p < 16; ++p)
            for (int64_t r = 0; r < 16; ++r) tile[p * 16 + r] = halves[s][r][p];
        }
      }
    }
  });
}

// The weights of a GEMM on tiles: bf16 w; int8 codes (w = code * scale[n]); or packed int4
// codes (`int4.py`'s layout: blocks of 16 rows, one per tile; w = code * scale + offset per group
// of G columns). Codes are exact in bf16, so every form meets x's parts in the same tiles; scales
// and offsets are applied to the f32 sums.
struct TileWeights {
  at::ScalarType dtype;
  const void* data;
  int64_t ld;           // elements (bytes for int4) per weight row
  const float* scale;   // bf16 / int8: [N] or null; int4: [N, groups, 2] in blocks of 16 rows
  int64_t group = 0;    // int4: G (a multiple of kTileK dividing kChunkK)
  int64_t groups = 0;   // int4: K / G of the whole row
  const float* bias = nullptr;  // [N] or null: added to the first chunk's sums

  // bf16 / int8: weight row n from column k0 on. int4: the block of rows n .. n + 15 (n a
  // multiple of 16) from column k0 on, its 16 rows' columns [k0, k0 + K) in 8 K bytes.
  const char* row(int64_t n, int64_t k0) const {
    const int64_t bytes = dtype == at::kBFloat16 ? 2 * (n * ld + k0)
                          : dtype == at::kChar   ? n * ld + k0
                                                 : n * ld + kI4BlockRows * k0 / 2;
    return static_cast<const char*>(data) + bytes;
  }
  int64_t row_bytes(int64_t K) const {  // stored bytes of K columns
    return dtype == at::kBFloat16 ? 2 * K : dtype == at::kChar ? K : K / 2;
  }
  // Cache line `i` of the stored weights of rows [n0, ...) and columns [k0, k0 + K), counted row
  // by row (bf16, int8: `lines` per row) or block by block (int4): what prefetching walks.
  const char* line_of(int64_t n0, int64_t k0, int64_t K, int64_t lines, int64_t i) const {
    if (dtype != at::kByte) return row(n0 + i / lines, k0) + i % lines * 64;
    const int64_t block_lines = kI4BlockRows * row_bytes(K) / 64;  // K % 32 == 0: whole lines
    return row(n0 + i / block_lines * kI4BlockRows, k0) + i % block_lines * 64;
  }
  // int4: (scale, offset) of row j of tile n (rows 16 n .. 16 n + 15) for group g of the row.
  float group_scale(int64_t n, int64_t j, int64_t g) const {
    return int4_group_scales(scale, n, groups, g)[j];
  }
  float group_offset(int64_t n, int64_t j, int64_t g) const {
    return int4_group_scales(scale, n, groups, g)[kI4BlockRows + j];
  }

  // Weight rows [n0, n0 + rows), columns [k0, k0 + K) as bf16 into dst (row stride K), or as
  // the int8 codes themselves for int8 tiles (`codes`: row stride K bytes). int4: n0 and rows
  // are multiples of 16 (whole blocks).
  void unpack(int64_t n0, int64_t rows, int64_t k0, int64_t K, bool codes, uint16_t* dst) const {
    if (codes && dtype == at::kChar) {
      for (int64_t r = 0; r < rows; ++r)
        std::memcpy(reinterpret_cast<char*>(dst) + r * K, row(n0 + r, k0), K);
      return;
    }
    if (dtype == at::kByte) {
      for (int64_t b = 0; b < rows; b += kI4BlockRows) {
        const uint8_t* block = reinterpret_cast<const uint8_t*>(row(n0 + b, 0));
        if (codes) {  // one code per byte, straight into the tile rows
          int4_block_codes(block, k0, K, reinterpret_cast<uint8_t*>(dst) + b * K, K);
          continue;
        }
        for (int64_t k = 0; k < K; k += kTileK) {  // via 32 columns of codes in L1
          alignas(64) uint8_t c[kI4BlockRows][kTileK];
          int4_block_codes(block, k0 + k, kTileK, c[0], kTileK);
          for (int64_t r = 0; r < kI4BlockRows; ++r) {
            const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                reinterpret_cast<const __m128i*>(c[r])));
            const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                reinterpret_cast<const __m128i*>(c[r] + 16)));
            uint16_t* out = dst + (b + r) * K + k;
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), int_to_bf16(v));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), int_to_bf16(w));
          }
        }
      }
      return;
    }
    for (int64_t r = 0; r < rows; ++r, dst += K) {
      if (dtype == at::kBFloat16) {
        std::memcpy(dst, row(n0 + r, k0), 2 * K);
      } else {
        const int8_t* src = reinterpret_cast<const int8_t*>(row(n0 + r, k0));
        for (int64_t k = 0; k < K; k += 16) {
          const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k),
                              int_to_bf16(_mm512_cvtepi8_epi32(codes)));
        }
      }
    }
  }
};

// v[i][j] -> v[j][i] for 16 x 16 floats in registers.
inline void transpose16(__m512 (&v)[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {  // per 128-bit lane: pairs of rows interleaved
    t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
  }
  auto lo = [](__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
  auto hi = [](__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
  for (int i = 0; i < 16; i += 4) {  // v[i + s], lane L: column 4 L + s of rows i .. i + 3
    v[i] = lo(t[i], t[i + 2]);
    v[i + 1] = hi(t[i], t[i + 2]);
    v[i + 2] = lo(t[i + 1], t[i + 3]);
    v[i + 3] = hi(t[i + 1], t[i + 3]);
  }
  for (int s = 0; s < 4; ++s) {  // column 4 L + s: lane L of v[s], v[4 + s], v[8 + s], v[12 + s]
    const __m512 ab0 = _mm512_shuffle_f32x4(v[s], v[4 + s], 0x44);
    const __m512 ab1 = _mm512_shuffle_f32x4(v[s], v[4 + s], 0xEE);
    const __m512 cd0 = _mm512_shuffle_f32x4(v[8 + s], v[12 + s], 0x44);
    const __m512 cd1 = _mm512_shuffle_f32x4(v[8 + s], v[12 + s], 0xEE);
    t[s] = _mm512_shuffle_f32x4(ab0, cd0, 0x88);
    t[4 + s] = _mm512_shuffle_f32x4(ab0, cd0, 0xDD);
    t[8 + s] = _mm512_shuffle_f32x4(ab1, cd1, 0x88);
    t[12 + s] = _mm512_shuffle_f32x4(ab1, cd1, 0xDD);
  }
  for (int i = 0; i < 16; ++i) v[i] = t[i];
}

// y[rows, N] (row stride N) = or += (`accumulate`) x @ w.T over the chunk of columns [k0, k0 + KB *
// 32), or, given `y_bf16` (the last chunk of a bf16 output), y_bf16 = y (if accumulating) + x @ w.T
// rounded to bf16: x as the `n_parts` parts of `split_x` (XB blocks of 16 rows), and for int4
// weights `xsums` [groups of the chunk][XB * 16], the sums of x over each group. With `int8_tiles`
// (int8 weights, int4 ones with G % 64 == 0): x as the halves of `split_x_int8` (XB = 2 per 16 rows
// of x; `xsums` then [groups][XB * 8]), `steps` its int16 steps per row (16 per block, rows past M
// included), column steps of 64, and the int32 sums of x block b's two halves combined as step *
// (256 hi + lo). Each thread takes blocks of weight rows (kBlockBytes), unpacked to bf16 in an
// aligned buffer that every x row then reuses from L2 (a checkpoint's mapped tensors start
// anywhere: safetensors packs them back to back, and a tile row straddling two cache lines made the
// GEMM 25-30% slower); every pair of x blocks meets every pair of weight-row blocks in 4 tiles of
// sums, each column step loading 2 weight tiles and, per part, 2 x tiles for 4 tdpbf16ps (the
// last x block of an odd count meets them alone: 262 rows are 17 blocks, 5% less work than 18).
// int4 sums are taken per group and scaled into f32 accumulators: y += scale * sum(code * x) +
// offset * sum(x).
template <int n_parts, bool int8_tiles = false>  // constants: the loop over parts unrolls (3-4%
                                                  // faster at 3)
void tile_products(const uint16_t* parts, int64_t XB, int64_t KB, int64_t rows,
                   const TileWeights& w, int64_t k0, const float* xsums, const float* steps,
                   int64_t N, bool accumulate, float* y, uint16_t* y_bf16) {
  auto x_tile = [&](int s, int64_t b, int64_t c) { return parts + ((s * XB + b) * KB + c) * 512; };
  const int64_t tiles = N / 16, threads = at::get_num_threads();
  constexpr bool fetch_ahead = n_parts == 1;  // int8 tiles: one pass too
  static_assert(!int8_tiles || n_parts == 1, "int8 tiles take x as one pair of halves");
  const int64_t bytes = fetch_ahead ? kBlockBytesOnePart : kBlockBytes;
  const int64_t fill = std::max<int64_t>(2, bytes / (2 * KB * kTileK) / 32 * 2);
  const int64_t block = std::min(fill, std::max<int64_t>(2, (tiles + threads - 1) / threads));
  const int64_t group_steps = w.group ? w.group / (int8_tiles ? kTileK8 : kTileK) : KB;
  const int64_t x_rows = int8_tiles ? XB / 2 * 16 : XB * 16;  // xsums' row stride
  // x blocks holding rows of x: bf16 tiles skip the last block of an odd count (all padding)
  const int64_t x_blocks = int8_tiles ? XB : (rows + 15) / 16;
  at::parallel_for(0, tiles, block, [&](int64_t begin, int64_t end) {
    configure_tiles();
    alignas(64) float sums[16][16];     // [weight row][x row]
    alignas(64) float acc[4][16][16];   // int4: the scaled sums of each tile
    const int64_t K = KB * (int8_tiles ? kTileK8 : kTileK), ldw = 64 * KB;  // ldw: tile row bytes
    thread_local std::vector<uint16_t> packed;  // 64 bytes of slack for the alignment below
    packed.resize(std::max<size_t>(packed.size(), block * 16 * ldw / 2 + 32));
    char* aligned = reinterpret_cast<char*>(
        (reinterpret_cast<uintptr_t>(packed.data()) + 63) & ~static_cast<uintptr_t>(63));
    alignas(64) int32_t halves[2][16][16];  // int8 tiles: [hi / lo][weight row][x row]
    auto write = [&](const float (&v)[16][16], int64_t n, int64_t b) {  // v: [weight][x row]
      __m512 c[16];
      for (int j = 0; j < 16; ++j) c[j] = _mm512_load_ps(v[j]);
      transpose16(c);
      const bool scaled = w.scale && !w.group, biased = w.bias && !accumulate;
      const __m512 s = scaled ? _mm512_loadu_ps(w.scale + n * 16) : _mm512_set1_ps(1);
      const __m512 add = biased ? _mm512_loadu_ps(w.bias + n * 16) : _mm512_setzero_ps();
      for (int64_t r = 0; r < 16 && b * 16 + r < rows; ++r) {
        const int64_t at = (b * 16 + r) * N + n * 16;
        __m512 v = _mm512_fmadd_ps(c[r], s, accumulate ? _mm512_loadu_ps(y + at) : add);
        if (y_bf16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(y_bf16 + at), take_bf16(v));
        else
          _mm512_storeu_ps(y + at, v);
      }
    };
    auto scale_into = [&](float (&a)[16][16], int64_t n, int64_t b, int64_t g) {
      const __m512 xs = _mm512_loadu_ps(xsums + g * x_rows + b * 16);
      for (int j = 0; j < 16; ++j) {
        const int64_t group = k0 / w.group + g;
        const __m512 v = _mm512_fmadd_ps(_mm512_set1_ps(w.group_scale(n, j, group)),
                                         _mm512_load_ps(sums[j]), _mm512_load_ps(a[j]));
        _mm512_store_ps(a[j], _mm512_fmadd_ps(_mm512_set1_ps(w.group_offset(n, j, group)), xs, v));
      }
    };
    // int4 on int8 tiles: a: [weight row][x row] += scale * (256 hi + lo) + offset * xs / step,
    // the last term's sums of x already divided by the rows' steps (`gemm_chunks_int8`); the
    // step multiplies the whole at the end. 256 hi + lo of one group is exact in int32 (|sum|
    // <= 128 * 15 * 256 * 257 < 2^31).
    auto fold_group = [&](float (&a)[16][16], int64_t n, int64_t b, int64_t g) {
      const __m512 xs = _mm512_loadu_ps(xsums + g * x_rows + b * 16);
      for (int j = 0; j < 16; ++j) {
        const __m512i sum = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(halves[0][j]), 8),
                                             _mm512_load_si512(halves[1][j]));
        const int64_t group = k0 / w.group + g;
        const __m512 v = _mm512_fmadd_ps(_mm512_set1_ps(w.group_offset(n, j, group)), xs,
                                         _mm512_load_ps(a[j]));
        _mm512_store_ps(a[j], _mm512_fmadd_ps(_mm512_set1_ps(w.group_scale(n, j, group)),
                                              _mm512_cvtepi32_ps(sum), v));
      }
    };
    const int64_t lines = (w.row_bytes(K) + 63) / 64;  // cache lines of a stored weight row
    for (int64_t n0 = begin; n0 < end; n0 += block) {
      const int64_t n1 = std::min(end, n0 + block);
      w.unpack(n0 * 16, (n1 - n0) * 16, k0, K, int8_tiles, reinterpret_cast<uint16_t*>(aligned));
      // The next block's cache lines, spread over this block's column steps, into L2.
      const int64_t next = fetch_ahead ? (std::min(end, n1 + block) - n1) * 16 * lines : 0;
      const int64_t per_step = (next + (XB / 2) * ((n1 - n0 + 1) / 2) * KB - 1) /
                               ((XB / 2) * ((n1 - n0 + 1) / 2) * KB);
      int64_t fetched = 0;
      for (int64_t b = 0; b < x_blocks; b += 2) {
        const bool x_two = b + 1 < x_blocks;  // tiles (., b + 1) in use
        for (int64_t n = n0; n < n1; n += 2) {
          const bool two = n + 1 < n1;
          const int used = two ? 4 : 2;  // tiles: (n, b), (n, b + 1), (n + 1, b), (n + 1, b + 1)
          const char* w0 = aligned + (n - n0) * 16 * ldw;
          const char* w1 = w0 + 16 * ldw;
          if (w.group) std::memset(acc, 0, sizeof(acc));
          for (int64_t c0 = 0; c0 < KB; c0 += group_steps) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t c = c0; c < c0 + group_steps; ++c) {
              if constexpr (fetch_ahead)
                for (int64_t i = 0; i < per_step && fetched < next; ++i, ++fetched)
                  _mm_prefetch(w.line_of(n1 * 16, k0, K, lines, fetched), _MM_HINT_T1);
              _tile_loadd(4, w0 + c * 64, ldw);
              if (two) _tile_loadd(5, w1 + c * 64, ldw);
              for (int s = 0; s < n_parts; ++s) {
                _tile_loadd(6, x_tile(s, b, c), 64);
                if (x_two) _tile_loadd(7, x_tile(s, b + 1, c), 64);
                if constexpr (int8_tiles) {
                  _tile_dpbssd(0, 4, 6);
                  _tile_dpbssd(1, 4, 7);
                  if (two) {
                    _tile_dpbssd(2, 5, 6);
                    _tile_dpbssd(3, 5, 7);
                  }
                } else {
                  _tile_dpbf16ps(0, 4, 6);
                  if (x_two) _tile_dpbf16ps(1, 4, 7);
                  if (two) {
                    _tile_dpbf16ps(2, 5, 6);
                    if (x_two) _tile_dpbf16ps(3, 5, 7);
                  }
                }
              }
            }
            if constexpr (int8_tiles) {  // tiles (n, hi), (n, lo), (n + 1, hi), (n + 1, lo)
              const __m512 step = _mm512_loadu_ps(steps + b / 2 * 16);  // [x row]
              for (int t = 0; t < used; t += 2) {
                if (t == 0) {
                  _tile_stored(0, halves[0], 64);
                  _tile_stored(1, halves[1], 64);
                } else {
                  _tile_stored(2, halves[0], 64);
                  _tile_stored(3, halves[1], 64);
                }
                if (w.group) {
                  fold_group(acc[t / 2], n + t / 2, b / 2, c0 / group_steps);
                  continue;
                }
                for (int j = 0; j < 16; ++j) {  // exact in f32 up to the one addition
                  const __m512 hi = _mm512_cvtepi32_ps(_mm512_load_si512(halves[0][j]));
                  const __m512 lo = _mm512_cvtepi32_ps(_mm512_load_si512(halves[1][j]));
                  _mm512_store_ps(sums[j], _mm512_mul_ps(
                                               _mm512_fmadd_ps(hi, _mm512_set1_ps(256), lo), step));
                }
                write(sums, n + t / 2, b / 2);
              }
              continue;
            }
            for (int t = 0; t < used; t += x_two ? 1 : 2) {  // tile numbers are immediates
              if (t == 0) _tile_stored(0, sums, 64);
              if (t == 1) _tile_stored(1, sums, 64);
              if (t == 2) _tile_stored(2, sums, 64);
              if (t == 3) _tile_stored(3, sums, 64);
              if (w.group)
                scale_into(acc[t], n + t / 2, b + t % 2, c0 / group_steps);
              else
                write(sums, n + t / 2, b + t % 2);
            }
          }
          if (w.group && int8_tiles) {
            const __m512 step = _mm512_loadu_ps(steps + b / 2 * 16);  // [x row]
            for (int t = 0; t < used; t += 2) {
              for (int j = 0; j < 16; ++j)
                _mm512_store_ps(acc[t / 2][j], _mm512_mul_ps(_mm512_load_ps(acc[t / 2][j]), step));
              write(acc[t / 2], n + t / 2, b / 2);
            }
          }
          else if (w.group)
            for (int t = 0; t < used; t += x_two ? 1 : 2) write(acc[t], n + t / 2, b + t % 2);
        }
      }
    }
    _tile_release();
  });
}

// x [M, K] (f32 in `n_parts` bf16 parts, or bf16 in one) @ w [N, K].T -> y [M, N] f32, or
// y_bf16 (then y holds the partial sums of all but the last chunk of columns, if any);
// K % 32 == 0, N % 16 == 0. x is taken kChunkM rows and kChunkK columns at a time: its parts
// stay in L2 / L3 while every weight row meets them, and their buffer stays small.
// The calling thread's buffer for x's tiles: kChunkK columns of kChunkM rows in kMaxParts bf16
// parts, or of kChunkM * kMaxParts rows in two int8 halves. Kept: a fresh buffer would be
// page-faulted in on every call.
uint16_t* x_tile_buffer() {
  thread_local std::vector<uint16_t> parts(kMaxParts * (kChunkM / 16) * (kChunkK / kTileK) * 512);
  return parts.data();
}

// x [rows, K] -> sums [K / G][stride] of each row over each group of G columns (rows past
// `rows`: 0), for int4's offsets.
template <typename X>
void group_sums(const X* x, int64_t ldx, int64_t rows, int64_t K, int64_t G, int64_t stride,
                std::vector<float>& sums) {
  sums.assign(K / G * stride, 0.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < K / G; ++g) {
      const X* xr = x + r * ldx + g * G;
      __m512 sum = _mm512_setzero_ps();
      for (int64_t k = 0; k < G; k += 16) sum = _mm512_add_ps(sum, load16(xr + k));
      sums[g * stride + r] = _mm512_reduce_add_ps(sum);
    }
}

template <typename X>
void gemm_chunks(const X* xp, int64_t ldx, int64_t M, int64_t K, int n_parts,
                 const TileWeights& w, int64_t N, float* yp, uint16_t* y_bf16) {
  uint16_t* parts = x_tile_buffer();
  thread_local std::vector<float> xsums;
  // Rows in equal chunks (520 = 512 + 8 would unpack every weight twice for 8 rows); one part
  // takes 3x the rows of three, the same memory.
  const int64_t chunks = (M + kChunkM * kMaxParts / n_parts - 1) / (kChunkM * kMaxParts / n_parts);
  const int64_t chunk_rows = ((M + chunks - 1) / chunks + 31) / 32 * 32;
  for (int64_t m0 = 0; m0 < M; m0 += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, M - m0), XB = (rows + 31) / 32 * 2;
    for (int64_t k0 = 0; k0 < K; k0 += kChunkK) {
      const int64_t width = std::min(kChunkK, K - k0);
      split_x(xp + m0 * ldx + k0, ldx, rows, width, XB, n_parts, parts);
      if (w.group) group_sums(xp + m0 * ldx + k0, ldx, rows, width, w.group, XB * 16, xsums);
      auto products = n_parts == 1   ? tile_products<1>
                      : n_parts == 2 ? tile_products<2>
                                     : tile_products<3>;
      const bool last = k0 + width == K;
      products(parts, XB, width / kTileK, rows, w, k0, xsums.data(), nullptr, N, k0 > 0,
               yp ? yp + m0 * N : nullptr, y_bf16 && last ? y_bf16 + m0 * N : nullptr);
    }
  }
}

// x [M, K] f32 @ w [N, K].T -> y [M, N] f32 on int8 tiles, for int8 w or packed int4 w (G % 64
// == 0), K % 64 == 0, N % 16 == 0: each row of x rounded to int16 steps of its largest |x| /
// 32639 (NaN if it holds a NaN), in chunks of rows and kChunkK columns as gemm_chunks takes
// them.
void gemm_chunks_int8(const float* xp, int64_t ldx, int64_t M, int64_t K, const TileWeights& w,
                      int64_t N, float* yp) {
  uint16_t* parts = x_tile_buffer();
  thread_local std::vector<float> steps, xsums;
  const int64_t chunks = (M + kChunkM * kMaxParts - 1) / (kChunkM * kMaxParts);
  const int64_t chunk_rows = ((M + chunks - 1) / chunks + 15) / 16 * 16;
  for (int64_t m0 = 0; m0 < M; m0 += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, M - m0);
    steps.assign((rows + 15) / 16 * 16, 0.0f);  // whole blocks: tile_products reads 16 at a time
    float* step = steps.data();  // not `steps` inside: each thread has its own thread_local
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) step[r] = int16_step(xp + (m0 + r) * ldx, K);
    });
    for (int64_t k0 = 0; k0 < K; k0 += kChunkK) {
      const int64_t width = std::min(kChunkK, K - k0);
      split_x_int8(xp + m0 * ldx + k0, ldx, rows, width, step, parts);
      if (w.group) {  // divided by the steps: `tile_products` multiplies them back at the end
        group_sums(xp + m0 * ldx + k0, ldx, rows, width, w.group, steps.size(), xsums);
        for (int64_t g = 0; g < width / w.group; ++g)
          for (int64_t r = 0; r < rows; ++r) xsums[g * steps.size() + r] /= step[r];
      }
      tile_products<1, true>(parts, (rows + 15) / 16 * 2, width / kTileK8, rows, w, k0,
                             xsums.data(), step, N, k0 > 0, yp + m0 * N, nullptr);
    }
  }
}

// The weights of the tile GEMM `op` for x [M, K], checked: packed int4 [N, K / 2] with its scales
// [N, K / G, 2]; or int8 (or, with `bf16`, bf16) [N, K] with unit column stride and scale float32
// [N] or none; bias float32 [N] or none.
TileWeights tile_weights(const char* op, const at::Tensor& w,
                         const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& bias, int64_t K, bool bf16) {
  const int64_t N = w.size(0);
  TileWeights tw{w.scalar_type(), w.data_ptr(), w.stride(0), nullptr};
  if (w.scalar_type() == at::kByte) {
    TORCH_CHECK(scale.has_value(), op, ": int4 weights need their scales");
    tw.group = int4_group(w, *scale, op);
    tw.groups = scale->size(1);
    TORCH_CHECK(2 * w.size(1) == K, op, ": int4 w must be [N, K / 2] with K = x.size(1)");
  } else {
    TORCH_CHECK(w.dim() == 2 && w.stride(1) == 1 && w.size(1) == K &&
                    (w.scalar_type() == at::kChar || (bf16 && w.scalar_type() == at::kBFloat16)),
                op, ": w must be ", bf16 ? "bf16 or int8" : "int8",
                " [N, K] with unit column stride");
  }
  tw.scale = w.scalar_type() == at::kByte ? scale->data_ptr<float>()  // checked by int4_group
                                          : float_values(op, "scale", scale, N);
  tw.bias = float_values(op, "bias", bias, N);
  return tw;
}

// The GEMM of many rows on AMX tiles ("amx-gemm"): x [M, K] float32 (split into `n_parts` bf16
// parts: 3 make every product exact, float32 numerics; 1 is bf16 x, `--matmul-precision
// medium`) or bf16 (1 part), both with unit column stride; w [N, K] bf16, int8 with scale [N],
// or packed int4 [N, K / 2] with scale [N, K / G, 2]; bias float32 [N] or none -> [M, N] float32,
// or bf16 for bf16 x (rounded once, from the f32 sums).
at::Tensor gemm_amx(const at::Tensor& x, const at::Tensor& w,
                    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias,
                    int64_t n_parts) {
  TORCH_CHECK(amx_permitted(), "gemm_amx: Linux refused the AMX tile state");
  const bool bf16_x = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || bf16_x) && x.stride(1) == 1,
              "gemm_amx: x must be float32 or bf16 [M, K] with unit column stride");
  TORCH_CHECK(n_parts >= 1 && n_parts <= kMaxParts && (!bf16_x || n_parts == 1),
              "gemm_amx: x takes 1 to 3 parts (bf16 x: 1), got ", n_parts);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const TileWeights tw = tile_weights("gemm_amx", w, scale, bias, K, /*bf16=*/true);
  TORCH_CHECK(K % kTileK == 0 && N % 16 == 0, "gemm_amx: K % 32 and N % 16 must be 0");
  if (!bf16_x) {
    at::Tensor y = at::empty({M, N}, x.options());
    gemm_chunks(x.data_ptr<float>(), x.stride(0), M, K, n_parts, tw, N, y.data_ptr<float>(),
                nullptr);
    return y;
  }
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor sums = K > kChunkK ? at::empty({M, N}, x.options().dtype(at::kFloat)) : at::Tensor();
  gemm_chunks(x.data_ptr<at::BFloat16>(), x.stride(0), M, K, 1, tw, N,
              sums.defined() ? sums.data_ptr<float>() : nullptr,
              reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()));
  return y;
}

// int8 and int4 weights at many rows on AMX-INT8 tiles ("amx-int8"): x [M, K] float32 (unit
// column stride) rounded to int16 steps per row; w int8 [N, K] with scale float32 [N] or none,
// or packed int4 [N, K / 2] with scale [N, K / G, 2], G % 64 == 0; bias float32 [N] or none ->
// [M, N] float32.
at::Tensor gemm_amx_int8(const at::Tensor& x, const at::Tensor& w,
                         const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(amx_permitted(), "gemm_amx_int8: Linux refused the AMX tile state");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1,
              "gemm_amx_int8: x must be float32 [M, K] with unit column stride");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const TileWeights tw = tile_weights("gemm_amx_int8", w, scale, bias, K, /*bf16=*/false);
  TORCH_CHECK(tw.group % kTileK8 == 0,
              "gemm_amx_int8: int4 weights need groups of a multiple of 64 columns");
  TORCH_CHECK(K % kTileK8 == 0 && N % 16 == 0, "gemm_amx_int8: K % 64 and N % 16 must be 0");
  at::Tensor y = at::empty({M, N}, x.options());
  gemm_chunks_int8(x.data_ptr<float>(), x.stride(0), M, K, tw, N, y.data_ptr<float>());
  return y;
}
#endif  // AMX

// exp(y) for y in [-87, 88] (callers clamp): y = n ln2 + r, |r| <= ln2 / 2 (ln2 in two parts,
// so that r is exact), exp(r) by Cephes' expf polynomial (about 1 ulp), times 2^n.
inline vf exp_clamped(vf y) {
  const vf n = round_nearest(mul(y, set1(1.44269504088896341f)));
  const vf r = fmadd(n, set1(2.12194440e-4f), fmadd(n, set1(-0.693359375f), y));
  vf p = set1(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f,
                  5.0000001201e-1f})
    p = fmadd(p, r, set1(c));
  return times_pow2(fmadd(p, mul(r, r), add(r, set1(1.0f))), n);
}

// gelu(x) = 0.5 x (1 + tanh(u)), u = sqrt(2 / pi) (x + 0.044715 x^3) (big_vision's nn.gelu with
// approximate=True), as x / (1 + exp(-2u)): the same function (0.5 (1 + tanh(u)) = sigmoid(2u))
// with one exp and one division, a few ulp from the exact value.
constexpr float kGeluBeta2 = 2 * 0.7978845608028654f, kGeluKappa = 0.044715f;
inline vf gelu_tanh(vf x) {
  const vf minus_2u = mul(mul(x, set1(-kGeluBeta2)), fmadd(mul(x, x), set1(kGeluKappa), set1(1)));
  return div(x, add(set1(1.0f), exp_clamped(clamp(minus_2u, -87.0f, 88.0f))));
}

// x = gelu(x) * other (or gelu(x)), in place: one pass where PyTorch's tanh-GELU and then a
// multiply take two, and its tanh is a slower one (benchmarks/RESULTS.md). float32, or bf16
// (`--matmul-precision medium`): widened, computed in f32 and rounded once to bf16.
template <typename T>
void gelu_tanh_values(T* xp, const T* op, int64_t n) {
  const int64_t vectors = n / kLanes;
  at::parallel_for(0, vectors, 2048, [&](int64_t v0, int64_t v1) {
    for (int64_t v = v0; v < v1; ++v) {
      vf g = gelu_tanh(widen(xp + v * kLanes));
      if (op) g = mul(g, widen(op + v * kLanes));
      store(xp + v * kLanes, g);
    }
  });
  for (int64_t i = vectors * kLanes; i < n; ++i) {
    const float x = static_cast<float>(xp[i]);
    const float u = 0.7978845608028654f * (x + kGeluKappa * x * x * x);
    const float scale = op ? static_cast<float>(op[i]) : 1.0f;
    xp[i] = static_cast<T>(0.5f * x * (1.0f + std::tanh(u)) * scale);
  }
}

void gelu_tanh_(at::Tensor x, const std::optional<at::Tensor>& other) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && x.is_contiguous(),
              "gelu_tanh_: x must be contiguous float32 or bfloat16");
  TORCH_CHECK(!other.has_value() || (other->scalar_type() == dtype &&
                                     other->is_contiguous() && other->sizes() == x.sizes()),
              "gelu_tanh_: other must be contiguous, of x's dtype and shape");
  if (dtype == at::kFloat)
    gelu_tanh_values(x.data_ptr<float>(), other ? other->data_ptr<float>() : nullptr, x.numel());
  else
    gelu_tanh_values(x.data_ptr<at::BFloat16>(),
                     other ? other->data_ptr<at::BFloat16>() : nullptr, x.numel());
}

// ---- The small ops between a decode step's matmuls: attention over the KV cache and RMSNorm.
// PyTorch runs each as several ops (SDPA plus the mask's bias; RMSNorm's five), whose fixed costs
// were about a fifth of an int4 decode step of the 3B model (benchmarks/RESULTS.md).

constexpr float kMaskFill = -2.3819763e38f;  // big_vision's K_MASK (`paligemma.gemma.MASK_FILL`)
constexpr int64_t kKeysPerTask = 32;         // keys per task of the scores' pass
constexpr int kScoreRows = 4;                // query rows per pass over two keys
constexpr int kValueRows = 4;                // query rows per pass over the values
constexpr int kValueVectors = 2;             // vectors of columns per pass over the values

// scores[r * S + j] = q[r] . keys[j] for R query rows (length H, R * H apart) and 2 keys
// (H apart): each vector of q and of the keys is loaded once for the 2R dot products.
template <int R>
inline void dot_rows_keys(const float* q, const float* keys, int64_t H, float* scores,
                          int64_t S) {
  vf acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = zero();
  int64_t h = 0;
  for (; h + kLanes <= H; h += kLanes) {
    const vf k0 = load(keys + h), k1 = load(keys + H + h);
    for (int r = 0; r < R; ++r) {
      const vf qr = load(q + r * H + h);
      acc[r][0] = fmadd(qr, k0, acc[r][0]);
      acc[r][1] = fmadd(qr, k1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 2; ++i) {
      float sum = hsum(acc[r][i]);
      for (int64_t t = h; t < H; ++t) sum += q[r * H + t] * keys[i * H + t];
      scores[r * S + i] = sum;
    }
}

// a . b over n floats (any n): two chains of vectors, then the tail.
inline float dot(const float* a, const float* b, int64_t n) {
  vf s0 = zero(), s1 = zero();
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    s0 = fmadd(load(a + i), load(b + i), s0);
    s1 = fmadd(load(a + i + kLanes), load(b + i + kLanes), s1);
  }
  if (i + kLanes <= n) s0 = fmadd(load(a + i), load(b + i), s0), i += kLanes;
  float sum = hsum(add(s0, s1));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// tanh(u) as Cephes' tanhf computes it, about 1 ulp: u + u^3 P(u^2) for |u| < 0.625, else
// 1 - 2 / (exp(2 |u|) + 1) with the sign of u.
inline vf tanh_cephes(vf u) {
  const vf a = vmax(u, sub(zero(), u));
  const vf z = mul(a, a);
  vf p = set1(-5.70498872745e-3f);
  for (float c : {2.06390887954e-2f, -5.37397155531e-2f, 1.33314422036e-1f, -3.33332819422e-1f})
    p = fmadd(p, z, set1(c));
  const vf small = fmadd(mul(p, z), a, a);
  const vf e = exp_clamped(clamp(add(a, a), -87.0f, 88.0f));
  const vf t = select_below(a, 0.625f, small, sub(set1(1.0f), div(set1(2.0f), add(e, set1(1.0f)))));
  return select_below(u, 0.0f, sub(zero(), t), t);
}

// probs[r, j] = softmax_j(p[r, j]) in place over one row of S scores: the largest score is
// subtracted before exp, masked scores (kMaskFill) get weights below e^-87 of the largest
// (1.6e-38: zero next to it in f32), and a row with every key masked is uniform, as the explicit
// f32 softmax of `paligemma.gemma.Attention` computes it.
inline void softmax_row(float* p, int64_t S) {
  vf m = set1(kMaskFill);
  int64_t j = 0;
  for (; j + kLanes <= S; j += kLanes) m = vmax(m, load(p + j));
  float top = hmax(m);
  for (; j < S; ++j) top = std::max(top, p[j]);
  vf sum = zero();
  for (j = 0; j + kLanes <= S; j += kLanes) {
    const vf e = exp_clamped(clamp(add(load(p + j), set1(-top)), -87.0f, 0.0f));
    store(p + j, e);
    sum = add(sum, e);
  }
  float total = hsum(sum);
  for (; j < S; ++j) total += p[j] = std::exp(std::max(p[j] - top, -87.0f));
  const vf inverse = set1(1.0f / total);
  for (j = 0; j + kLanes <= S; j += kLanes) store(p + j, mul(load(p + j), inverse));
  for (; j < S; ++j) p[j] *= 1.0f / total;
}

// out[r, h0 : h0 + V kLanes] = sum_j probs[r, j] v[j, h0 : h0 + V kLanes] for R query rows:
// each line of values is read once per R rows, each probability once per V vectors.
template <int R, int V>
inline void weighted_values(const float* probs, int64_t S, const float* v, int64_t H, int64_t h0,
                            float* out) {
  vf acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < V; ++c) acc[r][c] = zero();
  for (int64_t j = 0; j < S; ++j) {
    vf vj[V];
    for (int c = 0; c < V; ++c) vj[c] = load(v + j * H + h0 + c * kLanes);
    for (int r = 0; r < R; ++r) {
      const vf p = set1(probs[r * S + j]);
      for (int c = 0; c < V; ++c) acc[r][c] = fmadd(p, vj[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < V; ++c) store(out + r * H + h0 + c * kLanes, acc[r][c]);
}

// The same for one query row and the columns [h0, H) past the last whole vector.
inline void weighted_values_tail(const float* probs, int64_t S, const float* v, int64_t H,
                                 int64_t h0, float* out) {
  for (int64_t h = h0; h < H; ++h) {
    float sum = 0.0f;
    for (int64_t j = 0; j < S; ++j) sum += probs[j] * v[j * H + h];
    out[h] = sum;
  }
}

// Attention of a few query rows over the KV cache (a decode step): q [B, K, Q, H] float32
// (contiguous; Q = G * C: the G query heads of kv head K, each at C positions, roped and scaled),
// k and v [B, K, S, H] float32 whose rows of H are contiguous (the cache's slots [0, S)), mask
// [B, C, S] bool with unit key stride (True = may attend; query row g * C + c reads mask row c),
// softcap > 0 caps the scores at it (cap tanh(s / cap)) -> [B, K, Q, H] float32:
//   softmax_j(where(mask, cap(q . k_j), kMaskFill)) . v, with f32 sums.
// Three passes, each split across threads: the scores (keys in blocks of kKeysPerTask, each key
// read once for all Q rows), their softmax per row, and the weighted values (kValueVectors
// vectors of columns per task where H allows).
at::Tensor attend_cached(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& mask, double softcap) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "attend_cached: q must be contiguous float32 [B, K, Q, H]");
  const int64_t B = q.size(0), KH = q.size(1), Q = q.size(2), H = q.size(3), S = k.size(2);
  for (const at::Tensor* t : {&k, &v})
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kFloat && t->size(0) == B &&
                    t->size(1) == KH && t->size(2) == S && t->size(3) == H &&
                    t->stride(3) == 1 && t->stride(2) == H,
                "attend_cached: k and v must be float32 [B, K, S, H] (q's B, K, H) whose rows of ",
                "H are contiguous");
  TORCH_CHECK(mask.dim() == 3 && mask.scalar_type() == at::kBool && mask.size(0) == B &&
                  mask.size(1) > 0 && Q % mask.size(1) == 0 && mask.size(2) == S &&
                  mask.stride(2) == 1,
              "attend_cached: mask must be bool [B, C, S] with unit key stride, C dividing Q");
  const int64_t C = mask.size(1);
  at::Tensor probs = at::empty({B, KH, Q, S}, q.options());
  at::Tensor out = at::empty({B, KH, Q, H}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  float* pp = probs.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float cap = static_cast<float>(softcap);
  const int64_t blocks = (S + kKeysPerTask - 1) / kKeysPerTask;
  at::parallel_for(0, B * KH * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / blocks, b = bh / KH, j0 = t % blocks * kKeysPerTask;
      const int64_t j1 = std::min(S, j0 + kKeysPerTask);
      const float* keys = kp + b * k.stride(0) + bh % KH * k.stride(1);
      float* scores = pp + bh * Q * S;
      const float* qb = qp + bh * Q * H;
      int64_t j = j0;
      for (; j + 2 <= j1; j += 2) {
        int64_t r = 0;
        for (; r + kScoreRows <= Q; r += kScoreRows)
          dot_rows_keys<kScoreRows>(qb + r * H, keys + j * H, H, scores + r * S + j, S);
        for (; r < Q; ++r) dot_rows_keys<1>(qb + r * H, keys + j * H, H, scores + r * S + j, S);
      }
      for (; j < j1; ++j)
        for (int64_t r = 0; r < Q; ++r) scores[r * S + j] = dot(qb + r * H, keys + j * H, H);
      for (int64_t r = 0; r < Q; ++r) {
        float* row = scores + r * S;
        if (cap > 0) {
          int64_t j = j0;
          for (; j + kLanes <= j1; j += kLanes)
            store(row + j, mul(tanh_cephes(div(load(row + j), set1(cap))), set1(cap)));
          for (; j < j1; ++j) row[j] = cap * std::tanh(row[j] / cap);
        }
        const bool* allowed = mp + b * mask.stride(0) + r % C * mask.stride(1);
        for (int64_t j = j0; j < j1; ++j)
          if (!allowed[j]) row[j] = kMaskFill;
      }
    }
  });
  at::parallel_for(0, B * KH * Q, std::max<int64_t>(1, 4096 / S), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) softmax_row(pp + r * S, S);
  });
  // Tasks of kValueVectors vectors of columns, then single vectors, then the last partial one.
  const int64_t wide = H / (kValueVectors * kLanes), narrow = H / kLanes - wide * kValueVectors;
  const int64_t columns = wide + narrow + (H % kLanes ? 1 : 0);
  at::parallel_for(0, B * KH * columns, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / columns, c = t % columns;
      const int64_t h0 = c < wide ? c * kValueVectors * kLanes : (wide * kValueVectors + c - wide) * kLanes;
      const float* values = vp + bh / KH * v.stride(0) + bh % KH * v.stride(1);
      for (int64_t r = 0; r < Q;) {
        const float* p = pp + (bh * Q + r) * S;
        float* o = op + (bh * Q + r) * H;
        if (c >= wide + narrow) {
          weighted_values_tail(p, S, values, H, h0, o);
          r += 1;
        } else if (r + kValueRows > Q) {
          c < wide ? weighted_values<1, kValueVectors>(p, S, values, H, h0, o)
                   : weighted_values<1, 1>(p, S, values, H, h0, o);
          r += 1;
        } else {
          c < wide ? weighted_values<kValueRows, kValueVectors>(p, S, values, H, h0, o)
                   : weighted_values<kValueRows, 1>(p, S, values, H, h0, o);
          r += kValueRows;
        }
      }
    }
  });
  return out;
}

// x [M, D] float32 (rows contiguous), gain [D] float32 -> [M, D]: x * (1 / sqrt(mean(x^2) + eps))
// * gain, the two products rounded in that order as `paligemma.gemma.RMSNorm` computes them.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& gain, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1,
              "rms_norm: x must be float32 [M, D] with unit column stride");
  const int64_t M = x.size(0), D = x.size(1), ldx = x.stride(0);
  const float* g = float_values("rms_norm", "gain", gain, D);
  at::Tensor y = at::empty({M, D}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * ldx;
      float* yr = yp + r * D;
      const float squares = dot(xr, xr, D);
      const float inverse = 1.0f / std::sqrt(squares / static_cast<float>(D) +
                                             static_cast<float>(eps));
      const vf vinv = set1(inverse);
      int64_t d = 0;
      for (; d + kLanes <= D; d += kLanes)
        store(yr + d, mul(mul(load(xr + d), vinv), load(g + d)));
      for (; d < D; ++d) yr[d] = xr[d] * inverse * g[d];
    }
  });
  return y;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// "int8-gemm"'s two passes over x and over the output in one each (`layers._int8_mm`, which
// computes the same in PyTorch ops, bit for bit, without an AVX-512 build).
//
// x [M, K] f32 (unit column stride) -> halves int8 [2M, K] (the high halves' rows, then the low
// ones) and step [M]: each row rounded to int16 steps of its largest |x| / 32639 (x / step
// rounded to nearest even), u = 256 hi + lo with lo in [-128, 127]. A row holding a NaN gets a
// NaN step (its codes are then meaningless, and its outputs NaN).
void int8_halves(const at::Tensor& x, at::Tensor halves, at::Tensor step) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1,
              "int8_halves: x must be 2-D float32 with unit column stride");
  const int64_t M = x.size(0), K = x.size(1), ldx = x.stride(0);
  TORCH_CHECK(halves.scalar_type() == at::kChar && halves.is_contiguous() &&
                  halves.size(0) == 2 * M && halves.size(1) == K,
              "int8_halves: halves must be contiguous int8 [2M, K]");
  TORCH_CHECK(step.scalar_type() == at::kFloat && step.is_contiguous() && step.numel() == M,
              "int8_halves: step must be contiguous float32 [M]");
  const float* xp = x.data_ptr<float>();
  int8_t* hp = halves.data_ptr<int8_t>();
  float* sp = step.data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * ldx;
      const float st = sp[r] = int16_step(xr, K);
      int8_t* hi = hp + r * K;
      int8_t* lo = hp + (M + r) * K;
      const __m512 vst = _mm512_set1_ps(st);
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) {
        const __m512i u = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_loadu_ps(xr + k), vst));
        const __m512i h = _mm512_srai_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(128)), 8);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + k), _mm512_cvtepi32_epi8(h));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + k),
                         _mm512_cvtepi32_epi8(_mm512_sub_epi32(u, _mm512_slli_epi32(h, 8))));
      }
      for (; k < K; ++k) {
        const int32_t u = static_cast<int32_t>(std::nearbyint(xr[k] / st));
        const int32_t h = (u + 128) >> 8;
        hi[k] = static_cast<int8_t>(h);
        lo[k] = static_cast<int8_t>(u - (h << 8));
      }
    }
  });
}

// sums int32 [2M, W] (high halves' rows, then low ones) -> out [M, W] (unit column stride) =
// (lo + 256 hi) * step[row] * scale[column] (scale float32 [W] or none), rounded as in that order.
void int8_combine(const at::Tensor& sums, const at::Tensor& step,
                  const std::optional<at::Tensor>& scale, at::Tensor out) {
  TORCH_CHECK(out.dim() == 2 && out.scalar_type() == at::kFloat && out.stride(1) == 1,
              "int8_combine: out must be 2-D float32 with unit column stride");
  const int64_t M = out.size(0), W = out.size(1), ldo = out.stride(0);
  TORCH_CHECK(sums.scalar_type() == at::kInt && sums.is_contiguous() && sums.size(0) == 2 * M &&
                  sums.size(1) == W,
              "int8_combine: sums must be contiguous int32 [2M, W]");
  TORCH_CHECK(step.scalar_type() == at::kFloat && step.is_contiguous() && step.numel() == M,
              "int8_combine: step must be contiguous float32 [M]");
  const float* scp = float_values("int8_combine", "scale", scale, W);
  const int32_t* hp = sums.data_ptr<int32_t>();
  const float* sp = step.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int32_t* hi = hp + r * W;
      const int32_t* lo = hp + (M + r) * W;
      float* o = op + r * ldo;
      const __m512 vst = _mm512_set1_ps(sp[r]);
      int64_t j = 0;
      for (; j + 16 <= W; j += 16) {
        const __m512 h = _mm512_cvtepi32_ps(_mm512_loadu_si512(hi + j));
        const __m512 l = _mm512_cvtepi32_ps(_mm512_loadu_si512(lo + j));
        __m512 v = _mm512_mul_ps(_mm512_add_ps(l, _mm512_mul_ps(h, _mm512_set1_ps(256.0f))), vst);
        if (scp) v = _mm512_mul_ps(v, _mm512_loadu_ps(scp + j));
        _mm512_storeu_ps(o + j, v);
      }
      for (; j < W; ++j) {
        const float h = static_cast<float>(hi[j]) * 256.0f;
        float v = (static_cast<float>(lo[j]) + h) * sp[r];
        o[j] = scp ? v * scp[j] : v;
      }
    }
  });
}
#endif

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "gemv: x must be 2-D float32");
  if (w.scalar_type() == at::kByte) {
    TORCH_CHECK(x.is_contiguous() && scale.has_value(), "gemv: int4 needs contiguous x, scales");
    return gemv_int4(x, w, *scale);
  }
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1), "gemv: w must be [N, K] with K = x.size(1)");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "gemv: x and w must be contiguous");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  const float* s = float_values("gemv", "scale", scale, N);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (w.scalar_type()) {
    case at::kFloat: gemv_kernel(xp, M, w.data_ptr<float>(), s, N, K, yp); break;
    case at::kBFloat16: gemv_kernel(xp, M, w.data_ptr<at::BFloat16>(), s, N, K, yp); break;
    case at::kHalf: gemv_kernel(xp, M, w.data_ptr<at::Half>(), s, N, K, yp); break;
    case at::kChar: gemv_kernel_int8(xp, M, w.data_ptr<int8_t>(), s, N, K, yp); break;
    default: TORCH_CHECK(false, "gemv: unsupported weight dtype ", w.scalar_type());
  }
  return y;
}

}  // namespace

// Ops per instruction set (paligemma::gemv_avx2, paligemma::gemv_avx512, and int4_dequantize_ of
// each), so that both builds can be loaded into one process (tests compare them); fragments
// share the namespace.
TORCH_LIBRARY_FRAGMENT(paligemma, m) {
  m.def(PG_STR(PG_CAT(gemv_, PG_ISA)) "(Tensor x, Tensor w, Tensor? scale) -> Tensor");
  m.def(PG_STR(PG_CAT(int4_dequantize_, PG_ISA)) "(Tensor w, Tensor s, Tensor(a!) out) -> ()");
  m.def(PG_STR(PG_CAT(gelu_tanh_, PG_ISA)) "(Tensor(a!) x, Tensor? other) -> ()");
  m.def(PG_STR(PG_CAT(attend_cached_, PG_ISA))
        "(Tensor q, Tensor k, Tensor v, Tensor mask, float softcap) -> Tensor");
  m.def(PG_STR(PG_CAT(rms_norm_, PG_ISA)) "(Tensor x, Tensor gain, float eps) -> Tensor");
#if defined(__AVX512F__) && defined(__AVX512BW__)
  m.def(PG_STR(PG_CAT(int8_halves_, PG_ISA)) "(Tensor x, Tensor(a!) halves, Tensor(b!) step) -> ()");
  m.def(PG_STR(PG_CAT(int8_combine_, PG_ISA))
        "(Tensor sums, Tensor step, Tensor? scale, Tensor(a!) out) -> ()");
#endif
#if defined(__AMX_BF16__) && defined(__AMX_INT8__) && defined(__AMX_TILE__)
  m.def("gemm_amx(Tensor x, Tensor w, Tensor? scale, Tensor? bias, int parts) -> Tensor");
  m.def("gemm_amx_int8(Tensor x, Tensor w, Tensor? scale, Tensor? bias) -> Tensor");
#endif
}

TORCH_LIBRARY_IMPL(paligemma, CPU, m) {
  m.impl(PG_STR(PG_CAT(gemv_, PG_ISA)), &gemv);
  m.impl(PG_STR(PG_CAT(int4_dequantize_, PG_ISA)), &int4_dequantize);
  m.impl(PG_STR(PG_CAT(gelu_tanh_, PG_ISA)), &gelu_tanh_);
  m.impl(PG_STR(PG_CAT(attend_cached_, PG_ISA)), &attend_cached);
  m.impl(PG_STR(PG_CAT(rms_norm_, PG_ISA)), &rms_norm);
#if defined(__AVX512F__) && defined(__AVX512BW__)
  m.impl(PG_STR(PG_CAT(int8_halves_, PG_ISA)), &int8_halves);
  m.impl(PG_STR(PG_CAT(int8_combine_, PG_ISA)), &int8_combine);
#endif
#if defined(__AMX_BF16__) && defined(__AMX_INT8__) && defined(__AMX_TILE__)
  m.impl("gemm_amx", &gemm_amx);
  m.impl("gemm_amx_int8", &gemm_amx_int8);
#endif
}
