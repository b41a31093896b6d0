// int4 weights with group-wise scales and offsets (paligemma/int4.py): dequantization to float32
// for the GEMM of many rows (AVX2 + FMA). The decode matmul on the packed weights is in
// gemv.cpp, next to the int8 one it shares its int16 products with.
//
// Layout (the checkpoint's, see int4.py): w [N, K / 2] uint8; within each run of 32 columns,
// byte j holds column j in its low nibble and column j + 16 in its high nibble; q in [0, 15].
// s [N, K / G, 2] float32 holds (scale, offset) per group of G columns: w = q * scale + offset.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

namespace {

// 16 packed bytes -> columns 0..15 (low nibbles) and 16..31 (high nibbles) as int16 lanes.
inline void unpack32(const uint8_t* p, __m256i& lo, __m256i& hi) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0F);
  lo = _mm256_cvtepu8_epi16(_mm_and_si128(b, mask));
  hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), mask));
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
  m.def("dequantize(Tensor w, Tensor s, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(paligemma_int4, CPU, m) {
  m.impl("dequantize", &int4_dequantize);
}
