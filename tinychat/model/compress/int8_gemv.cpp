// tinychat::int8_gemv: y (M, N) = x (M, K) @ (w (N, K) int8 * scale (N, 1))^T for the few rows of a decode step.
//
// Why: at batch 1 every weight is read once per token, so the matmul should run at memory speed. aten's
// weight-only int8 kernel converts each weight to float before its multiply-add (about three instructions per
// eight weights on AVX2) and runs below that speed; llama.cpp's q8_0 instead quantizes the activations to int8
// in blocks of 32, multiplies integers (maddubs: 32 products in one instruction) and applies the two scales
// once per block. This is that algorithm for tinychat's int8 layout (symmetric, one scale per output row):
//   x[m, 32b : 32b+32] ~ dx[m, b] * qx[m, 32b : 32b+32]   (qx in [-127, 127], dx = max|x| / 127)
//   y[m, n] = scale[n] * sum_b dx[m, b] * sum_i qx[m, 32b+i] * w[n, 32b+i]   (exact integer inner sums)
// The only new error is the activations' rounding to 8 bits per block (what llama.cpp's q8_0 matmul does).
// Needs AVX2 and FMA, K % 32 == 0 and weights in [-127, 127] (QuantLinear in compress/quant.py checks all three).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;

// One row of x (K floats) -> K int8 values and K / 32 scales.
void quantize_row(const float* x, int64_t K, int8_t* q, float* d) {
  for (int64_t b = 0; b < K / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    float amax = 0.f;
    for (int64_t i = 0; i < kBlock; ++i) amax = std::fmax(amax, std::fabs(xb[i]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    d[b] = amax / 127.f;
    for (int64_t i = 0; i < kBlock; ++i) q[b * kBlock + i] = static_cast<int8_t>(std::nearbyint(xb[i] * inv));
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 32 products of one x block (|x| and sign x) with one w block, summed in pairs to 8 int32 lanes, as floats.
inline __m256 block_dot(__m256i ax, __m256i xs, const int8_t* w, __m256i ones) {
  const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i p16 = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv, xs));  // |x| * (w * sign x), no overflow
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
}

// acc += dx[b] * (qx block b . w block b)
inline __m256 block_step(__m256 acc, const int8_t* qx, const int8_t* ax, const float* dx, const int8_t* w, int64_t b,
                         __m256i ones) {
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + b * kBlock));
  const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ax + b * kBlock));
  return _mm256_fmadd_ps(block_dot(av, xv, w + b * kBlock, ones), _mm256_broadcast_ss(dx + b), acc);
}

// y[m, n0:n1] for every quantized x row m, one weight row after another, so that the weights are read as one
// sequential stream that the hardware prefetcher follows. An earlier version moved through four weight rows in
// lockstep, four streams that each broke off after K bytes, and read memory at 15-16 GB/s where this reads
// 21-23 (two threads, the small preset's decode matmuls). A weight row (K bytes) stays in L1 while each x row
// meets it. Four accumulators take blocks b % 4, so every row's sum has the same order whatever M is: a row's
// result does not depend on its batch-mates.
void rows_dot(const int8_t* qx, const int8_t* ax, const float* dx, int64_t M, const int8_t* w, const float* scale,
              int64_t K, int64_t n0, int64_t n1, float* y, int64_t N) {
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t nb = K / kBlock;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wn = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const int8_t *q = qx + m * K, *a = ax + m * K;
      const float* d = dx + m * nb;
      __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
      int64_t b = 0;
      for (; b + 4 <= nb; b += 4) {
        acc0 = block_step(acc0, q, a, d, wn, b, ones);
        acc1 = block_step(acc1, q, a, d, wn, b + 1, ones);
        acc2 = block_step(acc2, q, a, d, wn, b + 2, ones);
        acc3 = block_step(acc3, q, a, d, wn, b + 3, ones);
      }
      for (; b < nb; ++b) acc0 = block_step(acc0, q, a, d, wn, b, ones);
      y[m * N + n] = hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3))) * scale[n];
    }
  }
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "int8_gemv: x (M, K), w (N, K)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat,
              "int8_gemv: x float32, w int8, scale float32");
  TORCH_CHECK(w.size(1) % kBlock == 0 && scale.numel() == w.size(0), "int8_gemv: K % 32 == 0, one scale per row");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous(), sc = scale.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  at::Tensor y = at::empty({M, N}, xc.options());
  std::vector<int8_t> qx(M * K), ax(M * K);
  std::vector<float> dx(M * (K / kBlock));
  for (int64_t m = 0; m < M; ++m) quantize_row(xc.data_ptr<float>() + m * K, K, &qx[m * K], &dx[m * (K / kBlock)]);
  for (int64_t i = 0; i < M * K; ++i) ax[i] = static_cast<int8_t>(std::abs(qx[i]));  // |x| <= 127: no overflow
  const int8_t* wp = wc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // chunks of 64 rows, each thread streaming its own slice of the weights; a matrix under ~256 KB stays on one
  // thread (waking the second costs more than it saves there)
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / (64 * K));
  at::parallel_for(0, (N + 63) / 64, grain, [&](int64_t c0, int64_t c1) {
    const int64_t n0 = c0 * 64, n1 = std::min(N, c1 * 64);
    rows_dot(qx.data(), ax.data(), dx.data(), M, wp, sp, K, n0, n1, yp, N);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(tinychat, m) { m.def("int8_gemv(Tensor x, Tensor w, Tensor scale) -> Tensor"); }

TORCH_LIBRARY_IMPL(tinychat, CPU, m) { m.impl("int8_gemv", &int8_gemv); }
