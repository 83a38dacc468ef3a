// tinychat::int4_gemv: y (M, N) = x (M, K) @ W^T for the few rows of a decode step, W group-wise int4 held in
// aten's CPU int4 layout (`_convert_weight_to_int4pack_for_cpu(u, 1)`, the layout QuantLinear already keeps).
//
// Why: aten's int4 kernel is fast only for bf16 activations, and on a CPU without bf16 arithmetic (AVX2) it
// held int4 decoding at ~1.2-1.4x fp32, once fp32 decoding ran over packed weights (model/packed.py); the issue
// asks 1.6x. Half a byte a weight should make int4 the fastest format at batch 1, where every weight is read
// once per token.
//
// The layout (measured from aten's packing, checked by the tests): output columns in panels of 32; a panel is
// K rows of 16 bytes, byte j of row k holding u[n0 + j, k] in its low nibble and u[n0 + 16 + j, k] in its high
// one, u = q + 8 in [0, 15]. Scales and zero points are bf16 pairs sz[k / group, n] = (s, z), w = (u - 8) s + z.
// So for one activation x[k] the 32 weights of a panel's row k sit in 16 consecutive bytes: unpack them to
// floats and multiply-add them with x[k] broadcast. Activations stay fp32 (nothing is rounded but the weights):
//   y[m, n] = sum_g  s[g, n] * sum_{k in g} x[m, k] u[n, k]  +  (z[g, n] - 8 s[g, n]) * sum_{k in g} x[m, k]
// Each row's sum runs in the same order whatever M is, so a row's result does not depend on its batch-mates.
// Needs AVX2 and FMA and N % 32 == 0 (QuantLinear checks).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kPanel = 32;  // output columns per panel

// 8 (s, z) bf16 pairs -> s and z as floats (a bf16 is the high half of the float with the same bits)
inline void load_sz(const uint16_t* p, __m256* s, __m256* z) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  *s = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  *z = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// y[n0 : n0 + 32] for one x row over one panel (K rows of 16 bytes).
void panel_dot(const float* x, const float* xsum, const uint8_t* w, const uint16_t* sz, int64_t K, int64_t N,
               int64_t group, int64_t n0, float* y) {
  const __m256i low = _mm256_set1_epi32(0x0F);
  __m256 tot[4];
  for (int i = 0; i < 4; ++i) tot[i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < K / group; ++g) {
    // sum x u for columns 0-7, 8-15, 16-23, 24-31; even and odd k apart, so that eight chains of multiply-adds
    // run at once (one chain of four waited on the multiply-add's latency: 1.7 ms for the small preset's step)
    __m256 a[8];
    for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
    const uint8_t* wg = w + g * group * 16;
    const float* xg = x + g * group;
    for (int64_t k = 0; k < group; k += 2) {
#pragma GCC unroll 2
      for (int j = 0; j < 2; ++j) {
        // bytes 0-7 and 8-15 of row k widened to int32 lanes (two shuffles: a shuffle port, not the multiply-adds,
        // bounds this loop); the low nibble is column j, the high one column 16 + j
        const uint8_t* r = wg + (k + j) * 16;
        const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r)));
        const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r + 8)));
        const __m256 xk = _mm256_broadcast_ss(xg + k + j);
        __m256* c = a + 4 * j;
        c[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b0, low)), xk, c[0]);
        c[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b1, low)), xk, c[1]);
        c[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4)), xk, c[2]);
        c[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4)), xk, c[3]);
      }
    }
    const __m256 sx = _mm256_broadcast_ss(xsum + g);
    const __m256 eight = _mm256_set1_ps(8.f);
    const uint16_t* szg = sz + (g * N + n0) * 2;
    const __m256 acc[4] = {_mm256_add_ps(a[0], a[4]), _mm256_add_ps(a[1], a[5]), _mm256_add_ps(a[2], a[6]),
                          _mm256_add_ps(a[3], a[7])};
    for (int i = 0; i < 4; ++i) {
      __m256 s, z;
      load_sz(szg + i * 16, &s, &z);
      tot[i] = _mm256_fmadd_ps(s, acc[i], tot[i]);
      tot[i] = _mm256_fmadd_ps(_mm256_fnmadd_ps(eight, s, z), sx, tot[i]);  // (z - 8 s) * sum x
    }
  }
  for (int i = 0; i < 4; ++i) _mm256_storeu_ps(y + n0 + 8 * i, tot[i]);
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "int4_gemv: x (M, K) float32");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.size(1) * 2 == K, "int4_gemv: w (N, K / 2) uint8");
  const int64_t N = w.size(0);
  TORCH_CHECK(N % kPanel == 0 && group % 2 == 0 && K % group == 0, "int4_gemv: N % 32 == 0, K % group == 0, even group");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.numel() == K / group * N * 2, "int4_gemv: sz (K/group, N, 2)");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous(), szc = sz.contiguous();
  at::Tensor y = at::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  std::vector<float> xsum(M * (K / group));  // sum of x over each group, for the zero points and the offset 8
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < K / group; ++g) {
      float s = 0.f;
      for (int64_t k = 0; k < group; ++k) s += xp[m * K + g * group + k];
      xsum[m * (K / group) + g] = s;
    }
  const uint8_t* wp = wc.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(szc.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  // a panel is 16 K bytes; a matrix under ~128 KB stays on one thread (waking the second costs more there)
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / (16 * K));
  at::parallel_for(0, N / kPanel, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t m = 0; m < M; ++m)  // a panel (16 K bytes) stays in L1/L2 while each x row meets it
        panel_dot(xp + m * K, &xsum[m * (K / group)], wp + p * kPanel * K / 2, sp, K, N, group, p * kPanel,
                  yp + m * N);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tinychat, m) { m.def("int4_gemv(Tensor x, Tensor w, Tensor sz, int group) -> Tensor"); }

TORCH_LIBRARY_IMPL(tinychat, CPU, m) { m.impl("int4_gemv", &int4_gemv); }
