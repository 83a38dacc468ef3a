// tinychat::paged_decode_attention: one query per row attends over that row's keys where they lie in the pool.
//
// Why: the serving engine keeps keys/values in one pool of blocks (model/kv_cache.py PagedKVCache). To hand
// them to SDPA, a decode step gathers each row's span into a fresh (B, S, n_kv, hd) tensor per layer and
// builds a (B, 1, 1, S) mask, then SDPA's CPU kernel reads the copy again; for a few short rows those calls
// cost more than the arithmetic. This kernel reads every key and value row in place through `keys` (each
// row's pool positions, what PagedMeta already carries) and stops at the row's own position, so nothing is
// gathered or masked (vLLM's PagedAttention, for a CPU and one query per row).
//   q (B, H, 1, hd) float32, k_pool / v_pool (P, n_kv, hd) float32, keys (B, S) int64 pool positions,
//   positions (B, 1) int64: row b sees keys[b, 0..positions[b]].  ->  (B, H, 1, hd)
// A query head h reads key/value head h / (H / n_kv) (GQA). Softmax in float32 with its maximum subtracted,
// as SDPA's. Needs AVX2 and FMA (tinychat/model/native.py checks them) and hd % 8 == 0 (PagedKVCache does).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  return hsum(acc);
}

inline void axpy(float a, const float* x, float* y, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  for (int64_t i = 0; i < n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                  const at::Tensor& keys, const at::Tensor& positions, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "paged_decode_attention: q (B, H, 1, hd)");
  TORCH_CHECK(k_pool.dim() == 3 && v_pool.sizes() == k_pool.sizes(), "paged_decode_attention: pools (P, n_kv, hd)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_pool.scalar_type() == at::kFloat &&
                  v_pool.scalar_type() == at::kFloat,
              "paged_decode_attention: float32 only");
  TORCH_CHECK(keys.scalar_type() == at::kLong && positions.scalar_type() == at::kLong,
              "paged_decode_attention: int64 keys and positions");
  const int64_t B = q.size(0), H = q.size(1), hd = q.size(3), P = k_pool.size(0), KV = k_pool.size(1);
  const int64_t S = keys.size(1);
  TORCH_CHECK(k_pool.size(2) == hd && hd % 8 == 0 && H % KV == 0, "paged_decode_attention: hd % 8, H % n_kv");
  TORCH_CHECK(keys.size(0) == B && positions.numel() == B, "paged_decode_attention: keys (B, S), positions (B, 1)");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "paged_decode_attention: contiguous pools");
  const at::Tensor qc = q.contiguous(), kc = keys.contiguous(), pc = positions.contiguous();
  at::Tensor out = at::zeros({B, H, 1, hd}, qc.options());
  const float* qp = qc.data_ptr<float>();
  const float* kp = k_pool.data_ptr<float>();
  const float* vp = v_pool.data_ptr<float>();
  const int64_t* keyp = kc.data_ptr<int64_t>();
  const int64_t* posp = pc.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t G = H / KV, row = KV * hd;  // query heads per key head; floats per pool position
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * KV, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> w(G * S);  // this (row, key head)'s scores, then weights, for its G query heads
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / KV, g = i % KV;
      const int64_t n = std::min<int64_t>(S, std::max<int64_t>(0, posp[b] + 1));  // keys this row sees
      const int64_t* kb = keyp + b * S;
      for (int64_t j = 0; j < n; ++j) {
        TORCH_CHECK(kb[j] >= 0 && kb[j] < P, "paged_decode_attention: key position outside the pool");
        const float* k = kp + kb[j] * row + g * hd;
        for (int64_t h = 0; h < G; ++h) w[h * S + j] = dot(qp + ((b * H) + g * G + h) * hd, k, hd) * sc;
      }
      for (int64_t h = 0; h < G; ++h) {
        float* wh = &w[h * S];
        float mx = -INFINITY, sum = 0.f;
        for (int64_t j = 0; j < n; ++j) mx = std::max(mx, wh[j]);
        for (int64_t j = 0; j < n; ++j) sum += (wh[j] = std::exp(wh[j] - mx));
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        for (int64_t j = 0; j < n; ++j) wh[j] *= inv;
      }
      for (int64_t j = 0; j < n; ++j) {
        const float* v = vp + kb[j] * row + g * hd;
        for (int64_t h = 0; h < G; ++h) axpy(w[h * S + j], v, op + ((b * H) + g * G + h) * hd, hd);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tinychat, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor keys, Tensor positions, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tinychat, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
