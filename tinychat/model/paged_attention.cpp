// tinychat::paged_decode_attention: one query per row attends over that row's keys where they lie in the pool.
//
// Why: the serving engine keeps keys/values in one pool of blocks (model/kv_cache.py PagedKVCache). To hand
// them to SDPA, a decode step gathers each row's span into a fresh (B, S, n_kv, hd) tensor per layer and
// builds a (B, 1, 1, S) mask, then SDPA's CPU kernel reads the copy again; for a few short rows those calls
// cost more than the arithmetic. This kernel reads every key and value row in place through `keys` (each
// row's pool positions, what PagedMeta already carries) and stops at the row's own position, so nothing is
// gathered or masked (vLLM's PagedAttention, for a CPU and one query per row).
//   q (B, H, 1, hd) float32, k_pool / v_pool (P, n_kv, hd) float32, float16 or bfloat16 (both the same),
//   keys (B, S) int64 pool positions, positions (B, 1) int64: row b sees keys[b, 0..positions[b]].
//   ->  (B, H, 1, hd) float32
// A query head h reads key/value head h / (H / n_kv) (GQA). Softmax in float32 with its maximum subtracted,
// as SDPA's. A 16-bit pool (`serve --kv_cache_dtype`) is widened to float32 as it is read, so the arithmetic
// is the float32 kernel's over the rounded keys/values. Needs AVX2 and FMA (tinychat/model/native.py checks
// them), F16C for a float16 pool (PagedKVCache checks it) and hd % 8 == 0 (PagedKVCache does).

#pragma GCC target("f16c")  // vcvtph2ps, on every AVX2 CPU; only a float16 pool reaches it

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// Throughput, not latency (2026-12-05): a row's n keys are scored eight at a time (eight independent
// accumulators, then one transposing horizontal sum for all eight instead of a dependent chain and a sum per
// key), the softmax's exponentials are taken eight at a time, and the weighted sum of values keeps its output
// in registers across the keys instead of loading and storing it once per key. The first version, one key at a
// time, took as long at 64 rows of the tiny model as all of the step's matmuls; this one is 1.2-1.7x faster
// (bench/attention.py --against) and at 16-64 rows reads keys and values near the memory's speed.

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Eight pool values as float32: a float16 is widened by F16C, a bfloat16 is the top half of its float32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const at::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// The eight sums of a[0..7] as one vector: lane i holds the sum of a[i]'s lanes.
inline __m256 hsum8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// exp of eight floats (Cephes' expf: x = k ln2 + r, |r| <= ln2 / 2, a degree-5 polynomial for exp(r), 2^k from
// the exponent bits); relative error ~1e-7 over the softmax's range (x <= 0), 0 below -87.3.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3365448f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626f)), lo);
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

// scores[j] = scale * q . k_j for the n keys at k_rows[j] (hd floats each, hd % 8 == 0).
template <typename T>
void score(const float* q, const T* const* k_rows, int64_t n, int64_t hd, float scale, float* scores) {
  const __m256 sc = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 acc[8];
    for (int u = 0; u < 8; ++u) acc[u] = _mm256_setzero_ps();
    for (int64_t d = 0; d < hd; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      for (int u = 0; u < 8; ++u) acc[u] = _mm256_fmadd_ps(qv, load8(k_rows[j + u] + d), acc[u]);
    }
    _mm256_storeu_ps(scores + j, _mm256_mul_ps(hsum8(acc), sc));
  }
  for (; j < n; ++j) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < hd; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k_rows[j] + d), acc);
    scores[j] = hsum(acc) * scale;
  }
}

// w[0..n) <- softmax(w[0..n)), in float32 with the maximum subtracted, as SDPA's.
void softmax(float* w, int64_t n) {
  __m256 mv = _mm256_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(w + j));
  float mx = -INFINITY;
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mv);
  for (float l : lanes) mx = std::max(mx, l);
  for (int64_t t = j; t < n; ++t) mx = std::max(mx, w[t]);
  const __m256 m8 = _mm256_set1_ps(mx);
  __m256 sv = _mm256_setzero_ps();
  for (j = 0; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(w + j), m8));
    _mm256_storeu_ps(w + j, e);
    sv = _mm256_add_ps(sv, e);
  }
  float sum = hsum(sv);
  for (; j < n; ++j) sum += (w[j] = std::exp(w[j] - mx));
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  const __m256 iv = _mm256_set1_ps(inv);
  for (j = 0; j + 8 <= n; j += 8) _mm256_storeu_ps(w + j, _mm256_mul_ps(_mm256_loadu_ps(w + j), iv));
  for (; j < n; ++j) w[j] *= inv;
}

// out[0 .. 8C) = sum_j w[j] v_j[0 .. 8C), the output held in C registers across the keys.
template <typename T, int C>
void weigh(const float* w, const T* const* v_rows, int64_t n, int64_t off, float* out) {
  __m256 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const __m256 wj = _mm256_broadcast_ss(w + j);
    const T* v = v_rows[j] + off;
    for (int c = 0; c < C; ++c) acc[c] = _mm256_fmadd_ps(wj, load8(v + 8 * c), acc[c]);
  }
  for (int c = 0; c < C; ++c) _mm256_storeu_ps(out + 8 * c, acc[c]);
}

template <typename T>
using Weigh = void (*)(const float*, const T* const*, int64_t, int64_t, float*);
template <typename T>
constexpr Weigh<T> kWeigh[8] = {weigh<T, 1>, weigh<T, 2>, weigh<T, 3>, weigh<T, 4>,
                                weigh<T, 5>, weigh<T, 6>, weigh<T, 7>, weigh<T, 8>};

template <typename T>
void attend(const float* qp, const T* kp, const T* vp, const int64_t* keyp, const int64_t* posp, float* op, int64_t B,
            int64_t H, int64_t KV, int64_t hd, int64_t S, float sc) {
  const int64_t G = H / KV, row = KV * hd;  // query heads per key head; values per pool position
  at::parallel_for(0, B * KV, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> w(S);  // one query head's scores, then weights
    std::vector<const T*> k_rows(S), v_rows(S);  // this (row, key head)'s keys and values in the pool
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / KV, g = i % KV;
      const int64_t n = std::min<int64_t>(S, std::max<int64_t>(0, posp[b] + 1));  // keys this row sees
      const int64_t* kb = keyp + b * S;
      for (int64_t j = 0; j < n; ++j) {
        k_rows[j] = kp + kb[j] * row + g * hd;
        v_rows[j] = vp + kb[j] * row + g * hd;
      }
      for (int64_t h = 0; h < G; ++h) {
        const int64_t head = b * H + g * G + h;
        float* o = op + head * hd;
        if (n == 0) {  // sees no key: zeros, as before
          std::fill(o, o + hd, 0.f);
          continue;
        }
        score(qp + head * hd, k_rows.data(), n, hd, sc, w.data());
        softmax(w.data(), n);
        for (int64_t off = 0; off < hd; off += 64)
          kWeigh<T>[std::min<int64_t>(8, (hd - off) / 8) - 1](w.data(), v_rows.data(), n, off, o + off);
      }
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                  const at::Tensor& keys, const at::Tensor& positions, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "paged_decode_attention: q (B, H, 1, hd)");
  TORCH_CHECK(k_pool.dim() == 3 && v_pool.sizes() == k_pool.sizes(), "paged_decode_attention: pools (P, n_kv, hd)");
  const auto kind = k_pool.scalar_type();
  TORCH_CHECK(q.scalar_type() == at::kFloat && v_pool.scalar_type() == kind &&
                  (kind == at::kFloat || kind == at::kHalf || kind == at::kBFloat16),
              "paged_decode_attention: a float32 query over float32, float16 or bfloat16 pools");
  TORCH_CHECK(keys.scalar_type() == at::kLong && positions.scalar_type() == at::kLong,
              "paged_decode_attention: int64 keys and positions");
  const int64_t B = q.size(0), H = q.size(1), hd = q.size(3), P = k_pool.size(0), KV = k_pool.size(1);
  const int64_t S = keys.size(1);
  TORCH_CHECK(k_pool.size(2) == hd && hd % 8 == 0 && H % KV == 0, "paged_decode_attention: hd % 8, H % n_kv");
  TORCH_CHECK(keys.size(0) == B && positions.numel() == B, "paged_decode_attention: keys (B, S), positions (B, 1)");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "paged_decode_attention: contiguous pools");
  const at::Tensor qc = q.contiguous(), kc = keys.contiguous(), pc = positions.contiguous();
  at::Tensor out = at::empty({B, H, 1, hd}, qc.options());
  const int64_t* keyp = kc.data_ptr<int64_t>();
  const int64_t* posp = pc.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0, n = std::min<int64_t>(S, std::max<int64_t>(0, posp[b] + 1)); j < n; ++j)
      TORCH_CHECK(keyp[b * S + j] >= 0 && keyp[b * S + j] < P, "paged_decode_attention: key position outside the pool");
  const float sc = static_cast<float>(scale);
  const float* qp = qc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (kind == at::kHalf)
    attend(qp, k_pool.data_ptr<at::Half>(), v_pool.data_ptr<at::Half>(), keyp, posp, op, B, H, KV, hd, S, sc);
  else if (kind == at::kBFloat16)
    attend(qp, k_pool.data_ptr<at::BFloat16>(), v_pool.data_ptr<at::BFloat16>(), keyp, posp, op, B, H, KV, hd, S, sc);
  else
    attend(qp, k_pool.data_ptr<float>(), v_pool.data_ptr<float>(), keyp, posp, op, B, H, KV, hd, S, sc);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tinychat, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor keys, Tensor positions, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tinychat, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
