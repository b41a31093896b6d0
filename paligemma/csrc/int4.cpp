// int4 weights with group-wise scales and offsets (paligemma/int4.py): decode matmul and
// dequantization (AVX2 + FMA).
//
// Layout (the checkpoint's, see int4.py): w [N, K / 2] uint8; within each run of 32 columns,
// byte j holds column j in its low nibble and column j + 16 in its high nibble; q in [0, 15].
// s [N, K / G, 2] float32 holds (scale, offset) per group of G columns: w = q * scale + offset.
//
// gemv: decoding reads every weight once per token, so it should run at memory bandwidth; int4
// halves int8's bytes only if unpacking stays cheap. As the int8 path of gemv.cpp, x is rounded
// to int16 per group of G elements (relative error <= 2^-16 of the group's largest |x|, far
// below int4's own rounding) so that vpmaddwd makes 16 products per instruction; the nibbles
// are widened to int16 with one and / shift and one vpmovzxbw per 16 weights. Per group:
//   y[n] += scale[n, g] * xscale[g] * sum_k q[n, k] * xq[k] + offset[n, g] * sum_k x[k],
// the second sum taken in float32 from x itself. The int32 sums never overflow
// (256 / 32 * 2 * 15 * 32767 < 2^31 for G <= 256).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// 16 packed bytes -> columns 0..15 (low nibbles) and 16..31 (high nibbles) as int16 lanes.
inline void unpack32(const uint8_t* p, __m256i& lo, __m256i& hi) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0F);
  lo = _mm256_cvtepu8_epi16(_mm_and_si128(b, mask));
  hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), mask));
}

// x rows rounded to int16 per group of G: x ~ q * scale; plus each group's float32 sum.
struct QuantizedRows {
  std::vector<int16_t> q;     // [M, K]
  std::vector<float> scales;  // [M, groups]
  std::vector<float> sums;    // [M, groups]
};

QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K, int64_t G) {
  const int64_t groups = K / G;
  QuantizedRows r{std::vector<int16_t>(M * K), std::vector<float>(M * groups),
                  std::vector<float>(M * groups)};
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* xg = x + m * K + g * G;
      float amax = 0.0f, sum = 0.0f;
      for (int64_t k = 0; k < G; ++k) amax = std::max(amax, std::abs(xg[k])), sum += xg[k];
      const float s = amax > 0.0f ? amax / 32767.0f : 1.0f;
      r.scales[m * groups + g] = s;
      r.sums[m * groups + g] = sum;
      for (int64_t k = 0; k < G; ++k)
        r.q[m * K + g * G + k] = static_cast<int16_t>(std::nearbyint(xg[k] / s));
    }
  }
  return r;
}

// One weight row against XR rows of x (from row0), written to y[i * N].
template <int XR>
inline void dot_row(const QuantizedRows& xq, int64_t row0, const uint8_t* w, const float* s,
                    int64_t K, int64_t G, float* y, int64_t N) {
  const int64_t groups = K / G;
  __m256 acc[XR];
  float offset[XR] = {};
  for (int i = 0; i < XR; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i sum[XR][2];
    for (int i = 0; i < XR; ++i) sum[i][0] = sum[i][1] = _mm256_setzero_si256();
    for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
      __m256i lo, hi;
      unpack32(w + k / 2, lo, hi);
      for (int i = 0; i < XR; ++i) {
        const int16_t* xr = xq.q.data() + (row0 + i) * K + k;
        sum[i][0] = _mm256_add_epi32(
            sum[i][0], _mm256_madd_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr))));
        sum[i][1] = _mm256_add_epi32(
            sum[i][1],
            _mm256_madd_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 16))));
      }
    }
    for (int i = 0; i < XR; ++i) {
      const int64_t xg = (row0 + i) * groups + g;
      const __m256 scale = _mm256_set1_ps(s[2 * g] * xq.scales[xg]);
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(sum[i][0], sum[i][1])), scale,
                               acc[i]);
      offset[i] += s[2 * g + 1] * xq.sums[xg];
    }
  }
  for (int i = 0; i < XR; ++i) y[i * N] = hsum(acc[i]) + offset[i];
}

// Rows of x in blocks of 4, 2, 1: `row(XR, m)` handles rows [m, m + XR) against one weight row.
template <typename Row>
inline void for_row_blocks(int64_t M, const Row& row) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) row(std::integral_constant<int, 4>{}, m);
  if (m + 2 <= M) row(std::integral_constant<int, 2>{}, m), m += 2;
  if (m < M) row(std::integral_constant<int, 1>{}, m);
}

void check_weights(const at::Tensor& w, const at::Tensor& s, const char* op) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(), op,
              ": w must be contiguous uint8 [N, K / 2]");
  TORCH_CHECK(s.dim() == 3 && s.scalar_type() == at::kFloat && s.is_contiguous() &&
                  s.size(0) == w.size(0) && s.size(2) == 2,
              op, ": s must be contiguous float32 [N, K / G, 2]");
  const int64_t K = 2 * w.size(1), groups = s.size(1);
  TORCH_CHECK(groups > 0 && K % groups == 0 && (K / groups) % 32 == 0 && K / groups <= 256, op,
              ": group size K / groups must be a multiple of 32, at most 256");
}

// x [M, K] float32, w [N, K / 2] uint8, s [N, K / G, 2] float32 -> [M, N] float32.
at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s) {
  check_weights(w, s, "int4_gemv");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() &&
                  x.size(1) == 2 * w.size(1),
              "int4_gemv: x must be contiguous float32 [M, K] with K = 2 * w.size(1)");
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1), G = K / s.size(1);
  const QuantizedRows xq = quantize_rows(x.data_ptr<float>(), M, K, G);
  at::Tensor y = at::empty({M, N}, x.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Each thread takes a contiguous range of weight rows: one sequential stream per thread.
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for_row_blocks(M, [&](auto xr, int64_t m) {
        dot_row<decltype(xr)::value>(xq, m, wp + n * (K / 2), sp + n * (K / G) * 2, K, G,
                                     yp + m * N + n, N);
      });
    }
  });
  return y;
}

// w [N, K / 2] uint8, s [N, K / G, 2] -> out [N, K] float32 (written in place).
void int4_dequantize(const at::Tensor& w, const at::Tensor& s, at::Tensor out) {
  check_weights(w, s, "int4_dequantize");
  const int64_t N = w.size(0), K = 2 * w.size(1), G = K / s.size(1);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 &&
                  out.size(0) == N && out.size(1) == K,
              "int4_dequantize: out must be contiguous float32 [N, K]");
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t g = 0; g < K / G; ++g) {
        const __m256 scale = _mm256_set1_ps(sp[(n * (K / G) + g) * 2]);
        const __m256 offset = _mm256_set1_ps(sp[(n * (K / G) + g) * 2 + 1]);
        for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
          __m256i lo, hi;
          unpack32(wp + n * (K / 2) + k / 2, lo, hi);
          float* o = op + n * K + k;
          const __m256i parts[4] = {_mm256_cvtepu16_epi32(_mm256_castsi256_si128(lo)),
                                    _mm256_cvtepu16_epi32(_mm256_extracti128_si256(lo, 1)),
                                    _mm256_cvtepu16_epi32(_mm256_castsi256_si128(hi)),
                                    _mm256_cvtepu16_epi32(_mm256_extracti128_si256(hi, 1))};
          for (int p = 0; p < 4; ++p)
            _mm256_storeu_ps(o + 8 * p, _mm256_fmadd_ps(_mm256_cvtepi32_ps(parts[p]), scale, offset));
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(paligemma_int4, m) {
  m.def("gemv(Tensor x, Tensor w, Tensor s) -> Tensor");
  m.def("dequantize(Tensor w, Tensor s, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(paligemma_int4, CPU, m) {
  m.impl("gemv", &int4_gemv);
  m.impl("dequantize", &int4_dequantize);
}
