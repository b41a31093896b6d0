// y[M, N] = x[M, K] @ (w[N, K] * scale[N])^T for the few rows of a decode step (AVX2 + FMA).
//
// Decoding reads every weight once per token, so it should run at memory bandwidth. PyTorch's
// CPU kernels do for f32 weights at M = 1, but with bf16 / f16 / int8 weights (and f32 at M > 1)
// they are compute-bound on AVX2 machines: their cross-lane widening loads (vpmovzx/vpmovsx
// ymm) issue one per two cycles. Here weights are widened with in-lane shifts only, which puts
// them into a fixed lane order; x is permuted into that order once per call instead.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <vector>

namespace {

// Widen<W>::B weights, loaded at once, become V = B / 8 vectors of f32; lane i of vector r
// holds weight i * V + r of the block.
template <typename W>
struct Widen;

template <>
struct Widen<float> {
  static constexpr int B = 8, V = 1;
  static void load(const float* p, __m256* out) { out[0] = _mm256_loadu_ps(p); }
};

template <>
struct Widen<at::Half> {
  static constexpr int B = 8, V = 1;
  static void load(const at::Half* p, __m256* out) {
    out[0] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
};

template <>
struct Widen<at::BFloat16> {  // a bf16 is the top half of an f32
  static constexpr int B = 16, V = 2;
  static void load(const at::BFloat16* p, __m256* out) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    out[0] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    out[1] = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xFFFF0000)));
  }
};

template <>
struct Widen<int8_t> {  // sign-extend each byte of a 32-bit lane with shifts
  static constexpr int B = 32, V = 4;
  static void load(const int8_t* p, __m256* out) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    out[0] = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24), 24));
    out[1] = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 16), 24));
    out[2] = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 8), 24));
    out[3] = _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 24));
  }
};

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Four accumulators per x row hide the FMA latency; with XR = 2 rows that is 8 of the 16 ymm
// registers, plus up to 4 widened weights.
constexpr int kAcc = 4;

// Dot products of one weight row with XR rows of x. xp: x permuted (see permute_x), rows of K;
// the last K % B elements are summed in natural order from x.
template <typename W, int XR>
inline void dot_row(const float* xp, const float* x, const W* w, int64_t K, float scale,
                    float* y, int64_t N) {
  using Wd = Widen<W>;
  constexpr int U = kAcc / Wd::V;  // weight blocks per step
  __m256 acc[XR][kAcc];
  for (int i = 0; i < XR; ++i)
    for (int a = 0; a < kAcc; ++a) acc[i][a] = _mm256_setzero_ps();
  const int64_t body = K / Wd::B * Wd::B;
  int64_t k = 0;
  for (; k + U * Wd::B <= body; k += U * Wd::B) {
    __m256 wv[kAcc];
    for (int u = 0; u < U; ++u) Wd::load(w + k + u * Wd::B, wv + u * Wd::V);
    for (int i = 0; i < XR; ++i)
      for (int a = 0; a < kAcc; ++a)
        acc[i][a] = _mm256_fmadd_ps(_mm256_loadu_ps(xp + i * K + k + 8 * a), wv[a], acc[i][a]);
  }
  for (; k < body; k += Wd::B) {
    __m256 wv[Wd::V];
    Wd::load(w + k, wv);
    for (int i = 0; i < XR; ++i)
      for (int a = 0; a < Wd::V; ++a)
        acc[i][a] = _mm256_fmadd_ps(_mm256_loadu_ps(xp + i * K + k + 8 * a), wv[a], acc[i][a]);
  }
  for (int i = 0; i < XR; ++i) {
    __m256 sum = acc[i][0];
    for (int a = 1; a < kAcc; ++a) sum = _mm256_add_ps(sum, acc[i][a]);
    float s = hsum(sum);
    for (int64_t kk = body; kk < K; ++kk) s += x[i * K + kk] * static_cast<float>(w[kk]);
    y[i * N] = s * scale;
  }
}

// Within each block of B elements, element (lane i, vector r) takes x[i * V + r].
template <typename W>
std::vector<float> permute_x(const float* x, int64_t M, int64_t K) {
  using Wd = Widen<W>;
  std::vector<float> xp(M * K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k + Wd::B <= K; k += Wd::B)
      for (int r = 0; r < Wd::V; ++r)
        for (int i = 0; i < 8; ++i) xp[m * K + k + 8 * r + i] = x[m * K + k + i * Wd::V + r];
  return xp;
}

template <typename W>
void gemv_kernel(const float* x, int64_t M, const W* w, const float* scale, int64_t N,
                 int64_t K, float* y) {
  const std::vector<float> xp = permute_x<W>(x, M, K);
  // Each thread takes a contiguous range of weight rows: one sequential stream per thread, the
  // access pattern the hardware prefetcher follows best. Each row is read from memory once
  // and then reused from L1 by every pair of x rows.
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float s = scale ? scale[n] : 1.0f;
      const W* row = w + n * K;
      int64_t m = 0;
      for (; m + 2 <= M; m += 2)
        dot_row<W, 2>(xp.data() + m * K, x + m * K, row, K, s, y + m * N + n, N);
      if (m < M) dot_row<W, 1>(xp.data() + m * K, x + m * K, row, K, s, y + m * N + n, N);
    }
  });
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "gemv: x must be 2-D float32");
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1), "gemv: w must be [N, K] with K = x.size(1)");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "gemv: x and w must be contiguous");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  const float* s = nullptr;
  if (scale.has_value()) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->is_contiguous() &&
                    scale->numel() == N,
                "gemv: scale must be float32 [N]");
    s = scale->data_ptr<float>();
  }
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (w.scalar_type()) {
    case at::kFloat: gemv_kernel(xp, M, w.data_ptr<float>(), s, N, K, yp); break;
    case at::kBFloat16: gemv_kernel(xp, M, w.data_ptr<at::BFloat16>(), s, N, K, yp); break;
    case at::kHalf: gemv_kernel(xp, M, w.data_ptr<at::Half>(), s, N, K, yp); break;
    case at::kChar: gemv_kernel(xp, M, w.data_ptr<int8_t>(), s, N, K, yp); break;
    default: TORCH_CHECK(false, "gemv: unsupported weight dtype ", w.scalar_type());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(paligemma, m) { m.def("gemv(Tensor x, Tensor w, Tensor? scale) -> Tensor"); }

TORCH_LIBRARY_IMPL(paligemma, CPU, m) { m.impl("gemv", &gemv); }
