// tinychat::packed_linear: y (M, N) = x (M, K) @ w^T (+ bias) for the few rows of a decode step, over a weight
// packed once into panels of 16 output columns.
//
// Why: a decode step multiplies a handful of rows (one per running sequence) by every weight matrix once. MKL's
// sgemm, reached through F.linear, is built for large matrices: at 1-16 rows on the tiny preset's shapes it ran
// at 5-30 GFLOP/s per core where the weights came from memory, and the serving engine's 16-row step spent two
// thirds of its time there (docs/engine.md). Packing the weight so that each 16-column panel is one contiguous
// (K, 16) block lets a register tile of up to 6 rows x 16 columns read every weight once per 6 rows, straight
// from a sequential stream the hardware prefetches, with the tile's 12 accumulators in registers (the BLIS
// Haswell micro-kernel's shape). One row takes four panels at once instead, so that eight independent sums
// hide the FMA latency that a single row's two would expose.
//   pack_linear_weight(w (N, K) float32) -> (P, K, 16), P = ceil(N / 16), columns past N zero
//   packed_linear(x (M, K) float32, packed (P, K, 16), bias (N,) or None, N) -> (M, N)
// Each output is summed in the order k = 0..K-1 whatever M is, so a row's result does not depend on how many
// rows share the call or where it sits among them (MKL's blocking does not promise that).
// Needs AVX2 and FMA (tinychat/model/native.py checks them). Where the CPU has AVX-512, calls of two rows or
// more take tiles of up to 12 rows x 32 columns (two panels, one zmm register each: 24 accumulators of the 32
// registers), which read each weight once per 12 rows and do twice the arithmetic per instruction. The sums
// are the same fused multiply-adds in the same order, so both paths give the same bits (tested);
// packed_linear_avx512(false) turns the wider path off, as ATEN_CPU_CAPABILITY=avx2 does through native.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace {

constexpr int64_t NR = 16;  // output columns per panel: two ymm registers

// Store one row's 16 results (fewer in the matrix's last, partial panel).
inline void store16(float* out, __m256 lo, __m256 hi, int64_t valid) {
  if (valid >= NR) {
    _mm256_storeu_ps(out, lo);
    _mm256_storeu_ps(out + 8, hi);
    return;
  }
  alignas(32) float tmp[NR];
  _mm256_store_ps(tmp, lo);
  _mm256_store_ps(tmp + 8, hi);
  for (int64_t j = 0; j < valid; ++j) out[j] = tmp[j];
}

// The bias of columns c..c+15 (zeros past N, or without a bias) as the accumulators' start.
inline void bias16(const float* bias, int64_t c, int64_t N, __m256* lo, __m256* hi) {
  alignas(32) float tmp[NR] = {0};
  if (bias)
    for (int64_t j = 0; j < NR && c + j < N; ++j) tmp[j] = bias[c + j];
  *lo = _mm256_load_ps(tmp);
  *hi = _mm256_load_ps(tmp + 8);
}

// y[0:MR, c:c+16] = x[0:MR, :] @ panel (K, 16) (+ bias). The accumulators are named variables: GCC keeps an
// indexed array of them on the stack, with a store per update (3x slower, measured).
template <int MR>
inline void tile(const float* x, int64_t ldx, const float* panel, int64_t K, const float* bias, float* y, int64_t ldy,
                 int64_t c, int64_t N) {
  __m256 b0, b1;
  bias16(bias, c, N, &b0, &b1);
  __m256 c00 = b0, c01 = b1, c10 = b0, c11 = b1, c20 = b0, c21 = b1, c30 = b0, c31 = b1, c40 = b0, c41 = b1,
         c50 = b0, c51 = b1;
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(panel + k * NR), w1 = _mm256_loadu_ps(panel + k * NR + 8);
#define TINYCHAT_ROW(r)                                      \
  if constexpr (MR > r) {                                    \
    const __m256 a = _mm256_broadcast_ss(x + r * ldx + k);   \
    c##r##0 = _mm256_fmadd_ps(a, w0, c##r##0);               \
    c##r##1 = _mm256_fmadd_ps(a, w1, c##r##1);               \
  }
    TINYCHAT_ROW(0) TINYCHAT_ROW(1) TINYCHAT_ROW(2) TINYCHAT_ROW(3) TINYCHAT_ROW(4) TINYCHAT_ROW(5)
#undef TINYCHAT_ROW
  }
  const int64_t valid = N - c;
#define TINYCHAT_OUT(r) \
  if constexpr (MR > r) store16(y + r * ldy + c, c##r##0, c##r##1, valid);
  TINYCHAT_OUT(0) TINYCHAT_OUT(1) TINYCHAT_OUT(2) TINYCHAT_OUT(3) TINYCHAT_OUT(4) TINYCHAT_OUT(5)
#undef TINYCHAT_OUT
}

// One row against four consecutive panels (64 columns): eight independent sums, same order of k as tile<1>.
inline void row4(const float* x, const float* panels, int64_t K, const float* bias, float* y, int64_t c, int64_t N) {
  const int64_t ps = K * NR;
  __m256 a0, a1, b0, b1, d0, d1, e0, e1;
  bias16(bias, c, N, &a0, &a1);
  bias16(bias, c + NR, N, &b0, &b1);
  bias16(bias, c + 2 * NR, N, &d0, &d1);
  bias16(bias, c + 3 * NR, N, &e0, &e1);
  for (int64_t k = 0; k < K; ++k) {
    const __m256 a = _mm256_broadcast_ss(x + k);
    const float* p = panels + k * NR;
    a0 = _mm256_fmadd_ps(a, _mm256_loadu_ps(p), a0);
    a1 = _mm256_fmadd_ps(a, _mm256_loadu_ps(p + 8), a1);
    b0 = _mm256_fmadd_ps(a, _mm256_loadu_ps(p + ps), b0);
    b1 = _mm256_fmadd_ps(a, _mm256_loadu_ps(p + ps + 8), b1);
    d0 = _mm256_fmadd_ps(a, _mm256_loadu_ps(p + 2 * ps), d0);
    d1 = _mm256_fmadd_ps(a, _mm256_loadu_ps(p + 2 * ps + 8), d1);
    e0 = _mm256_fmadd_ps(a, _mm256_loadu_ps(p + 3 * ps), e0);
    e1 = _mm256_fmadd_ps(a, _mm256_loadu_ps(p + 3 * ps + 8), e1);
  }
  store16(y + c, a0, a1, N - c);
  store16(y + c + NR, b0, b1, N - c - NR);
  store16(y + c + 2 * NR, d0, d1, N - c - 2 * NR);
  store16(y + c + 3 * NR, e0, e1, N - c - 3 * NR);
}

// Panels [p0, p1) for MR rows of x.
template <int MR>
void panels(const float* x, int64_t ldx, const float* packed, int64_t K, const float* bias, float* y, int64_t ldy,
            int64_t p0, int64_t p1, int64_t N) {
  int64_t p = p0;
  if constexpr (MR == 1)
    for (; p + 4 <= p1; p += 4) row4(x, packed + p * K * NR, K, bias, y, p * NR, N);
  for (; p < p1; ++p) tile<MR>(x, ldx, packed + p * K * NR, K, bias, y, ldy, p * NR, N);
}

// The row-tile function for each number of rows (index = rows).
using RowsFn = void (*)(const float*, int64_t, const float*, int64_t, const float*, float*, int64_t, int64_t, int64_t,
                        int64_t);
constexpr RowsFn kRows[] = {nullptr, panels<1>, panels<2>, panels<3>, panels<4>, panels<5>, panels<6>};

// ------------------------------------------------------------------------------------------------ AVX-512
#define TINYCHAT_AVX512 __attribute__((target("avx512f,avx2,fma")))

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");  // libgcc also checks that the OS saves the zmm state
}

std::atomic<bool> use_avx512{cpu_has_avx512()};

constexpr int64_t MR512 = 12;  // rows per AVX-512 tile

TINYCHAT_AVX512 inline __mmask16 lanes(int64_t valid) {
  return valid >= NR ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1);
}

// The bias of columns c..c+15 (zeros past N, or without a bias): the accumulators' start, as bias16's.
TINYCHAT_AVX512 inline __m512 bias512(const float* bias, int64_t c, int64_t N) {
  return bias ? _mm512_maskz_loadu_ps(lanes(N - c), bias + c) : _mm512_setzero_ps();
}

TINYCHAT_AVX512 inline void store512(float* out, __m512 v, int64_t valid) {
  _mm512_mask_storeu_ps(out, lanes(valid), v);
}

// y[0:MR, c:c+16*NP] = x[0:MR, :] @ NP consecutive panels (+ bias): tile<MR>'s sums, with one zmm per panel row.
template <int MR, int NP>
TINYCHAT_AVX512 inline void tile512(const float* x, int64_t ldx, const float* panel, int64_t K, const float* bias,
                                    float* y, int64_t ldy, int64_t c, int64_t N) {
  const int64_t ps = K * NR;
  const __m512 b0 = bias512(bias, c, N), b1 = NP > 1 ? bias512(bias, c + NR, N) : b0;
#define TINYCHAT_ACC(r) __m512 c##r##_0 = b0, c##r##_1 = b1;
  TINYCHAT_ACC(0) TINYCHAT_ACC(1) TINYCHAT_ACC(2) TINYCHAT_ACC(3) TINYCHAT_ACC(4) TINYCHAT_ACC(5)
  TINYCHAT_ACC(6) TINYCHAT_ACC(7) TINYCHAT_ACC(8) TINYCHAT_ACC(9) TINYCHAT_ACC(10) TINYCHAT_ACC(11)
#undef TINYCHAT_ACC
  for (int64_t k = 0; k < K; ++k) {
    const __m512 w0 = _mm512_loadu_ps(panel + k * NR);
    const __m512 w1 = NP > 1 ? _mm512_loadu_ps(panel + ps + k * NR) : w0;
#define TINYCHAT_ROW(r)                                  \
  if constexpr (MR > r) {                                \
    const __m512 a = _mm512_set1_ps(x[r * ldx + k]);     \
    c##r##_0 = _mm512_fmadd_ps(a, w0, c##r##_0);         \
    if constexpr (NP > 1) c##r##_1 = _mm512_fmadd_ps(a, w1, c##r##_1); \
  }
    TINYCHAT_ROW(0) TINYCHAT_ROW(1) TINYCHAT_ROW(2) TINYCHAT_ROW(3) TINYCHAT_ROW(4) TINYCHAT_ROW(5)
    TINYCHAT_ROW(6) TINYCHAT_ROW(7) TINYCHAT_ROW(8) TINYCHAT_ROW(9) TINYCHAT_ROW(10) TINYCHAT_ROW(11)
#undef TINYCHAT_ROW
  }
#define TINYCHAT_OUT(r)                                                  \
  if constexpr (MR > r) {                                                \
    store512(y + r * ldy + c, c##r##_0, N - c);                          \
    if constexpr (NP > 1) store512(y + r * ldy + c + NR, c##r##_1, N - c - NR); \
  }
  TINYCHAT_OUT(0) TINYCHAT_OUT(1) TINYCHAT_OUT(2) TINYCHAT_OUT(3) TINYCHAT_OUT(4) TINYCHAT_OUT(5)
  TINYCHAT_OUT(6) TINYCHAT_OUT(7) TINYCHAT_OUT(8) TINYCHAT_OUT(9) TINYCHAT_OUT(10) TINYCHAT_OUT(11)
#undef TINYCHAT_OUT
}

// Panels [p0, p1) for MR rows of x, two at a time.
template <int MR>
TINYCHAT_AVX512 void panels512(const float* x, int64_t ldx, const float* packed, int64_t K, const float* bias,
                               float* y, int64_t ldy, int64_t p0, int64_t p1, int64_t N) {
  int64_t p = p0;
  for (; p + 2 <= p1; p += 2) tile512<MR, 2>(x, ldx, packed + p * K * NR, K, bias, y, ldy, p * NR, N);
  if (p < p1) tile512<MR, 1>(x, ldx, packed + p * K * NR, K, bias, y, ldy, p * NR, N);
}

constexpr RowsFn kRows512[] = {nullptr,        panels512<1>,  panels512<2>, panels512<3>, panels512<4>,
                                panels512<5>,   panels512<6>,  panels512<7>, panels512<8>, panels512<9>,
                                panels512<10>,  panels512<11>, panels512<12>};

// Whether calls of two rows or more take the AVX-512 tiles; sets it (never on where the CPU lacks AVX-512) and
// returns what it was.
bool packed_linear_avx512(bool on) { return use_avx512.exchange(on && cpu_has_avx512()); }

// ------------------------------------------------------------------------------------------------ the ops
at::Tensor pack_linear_weight(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "pack_linear_weight: w (N, K) float32");
  const int64_t N = w.size(0), K = w.size(1), P = (N + NR - 1) / NR;
  at::Tensor padded = at::zeros({P * NR, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  return padded.view({P, NR, K}).transpose(1, 2).contiguous();  // (P, K, 16): panel p, row k = w[16p:16p+16, k]
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                         int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "packed_linear: x (M, K) float32");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kFloat && packed.is_contiguous() &&
                  packed.size(1) == x.size(1) && packed.size(2) == NR && packed.size(0) * NR >= N &&
                  packed.size(0) * NR < N + NR,
              "packed_linear: packed (ceil(N / 16), K, 16) float32 from pack_linear_weight");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->numel() == N),
              "packed_linear: bias (N,) float32");
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t M = xc.size(0), K = xc.size(1), P = packed.size(0);
  at::Tensor y = at::empty({M, N}, xc.options());
  if (M == 0 || N == 0) return y;
  const float* xp = xc.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  const float* bp = bias.has_value() ? bc.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // threads split the panels (each streams its own slice of the weight); under ~256 KB a matrix stays on one
  const int64_t grain = std::max<int64_t>(4, (int64_t{1} << 16) / (K * NR));
  // one row is bound by reading the weights, not by arithmetic: it keeps row4's eight AVX2 sums
  const bool wide = M > 1 && use_avx512.load(std::memory_order_relaxed);
  const int64_t mr = wide ? MR512 : 6;
  at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
    // four panels at a time (64 KB at K = 256), reused by every row tile while they sit in L1/L2
    for (int64_t pb = p0; pb < p1; pb += 4) {
      const int64_t pe = std::min(p1, pb + 4);
      for (int64_t m = 0; m < M; m += mr) {
        const int64_t n = std::min(mr, M - m);
        (wide ? kRows512 : kRows)[n](xp + m * K, K, wp, K, bp, yp + m * N, N, pb, pe, N);
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tinychat, m) {
  m.def("pack_linear_weight(Tensor w) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor packed, Tensor? bias, int n) -> Tensor");
  m.def("packed_linear_avx512(bool on) -> bool", &packed_linear_avx512);
}

TORCH_LIBRARY_IMPL(tinychat, CPU, m) {
  m.impl("pack_linear_weight", &pack_linear_weight);
  m.impl("packed_linear", &packed_linear);
}
