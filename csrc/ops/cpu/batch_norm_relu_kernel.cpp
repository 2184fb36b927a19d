// CPU kernels of the fused training-mode BatchNorm (+ residual, + ReLU) ops (schemas in ops/batch_norm_relu.cpp).
//
// The input is a contiguous [P, C, L] tensor. Each pass walks it in order, P split into a fixed number of
// blocks so that the per-channel sums are reduced in the same order whatever the thread count (training
// stays bit-for-bit reproducible). bfloat16 activations are computed in float32 with float32 statistics and
// parameters, each output rounded once. The loops are compiled for AVX-512, AVX2+FMA and baseline x86-64, and the
// loader picks one for the CPU at hand (GCC target_clones).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "ops/batch_norm_relu.h"

// GCC warns that passing or returning 64-byte vectors changes the ABI where AVX-512 is off; the helpers that
// do are always inlined into the clones below, so no such call exists.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace graspext::ops {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GRASPEXT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GRASPEXT_CLONES
#endif
#define GRASPEXT_INLINE inline __attribute__((always_inline))

constexpr int64_t kBlocks = 64;  // fixed split of P for the per-channel sums (not the thread count)

// 64 bytes of T as a GCC vector: each clone lowers it to the registers its instruction set has (one zmm,
// two ymm, four xmm), where auto-vectorized reductions came out as scalar shuffles.
template <typename T>
struct Vec {
  static constexpr int kWidth = 64 / sizeof(T);
  typedef T type __attribute__((vector_size(64)));
  typedef T unaligned __attribute__((vector_size(64), aligned(sizeof(T)), may_alias));
  static GRASPEXT_INLINE type load(const T* p) { return *reinterpret_cast<const unaligned*>(p); }
  static GRASPEXT_INLINE void store(T* p, type v) { *reinterpret_cast<unaligned*>(p) = v; }
  static GRASPEXT_INLINE T sum(type v) {
    T s = 0;
    for (int k = 0; k < kWidth; ++k) s += v[k];
    return s;
  }
};

// Activations are stored as S and computed in T = Compute<S>: float32 and float64 as themselves, bfloat16
// (its bits, uint16_t) in float32, rounded back to nearest even on store as c10::BFloat16 does. Statistics and
// per-channel coefficients are always T.
template <typename S>
struct Storage {
  using T = S;
  static GRASPEXT_INLINE T get(S v) { return v; }
  static GRASPEXT_INLINE S put(T v) { return v; }
  static GRASPEXT_INLINE typename Vec<T>::type load(const S* p) { return Vec<T>::load(p); }
};

template <>
struct Storage<uint16_t> {
  using T = float;
  typedef uint16_t halves __attribute__((vector_size(32), aligned(2), may_alias));
  typedef uint32_t words __attribute__((vector_size(64)));
  static GRASPEXT_INLINE float get(uint16_t v) { return __builtin_bit_cast(float, static_cast<uint32_t>(v) << 16); }
  static GRASPEXT_INLINE uint16_t put(float v) {
    const uint32_t u = __builtin_bit_cast(uint32_t, v);
    return v != v ? uint16_t{0x7fc0} : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  // Vec<float>::kWidth values, widened by a shift (no rounding: every bfloat16 is a float32).
  static GRASPEXT_INLINE Vec<float>::type load(const uint16_t* p) {
    return (Vec<float>::type)(__builtin_convertvector(*reinterpret_cast<const halves*>(p), words) << 16);
  }
};

template <typename S>
using Compute = typename Storage<S>::T;

// One channel-row of n values: the sum and the sum of squares of (x - shift).
template <typename S, typename T = Compute<S>>
GRASPEXT_INLINE void row_moments(const S* x, int64_t n, T shift, T& sum, T& sq) {
  using V = Vec<T>;
  using St = Storage<S>;
  typename V::type s = {}, q = {};
  const typename V::type sh = typename V::type{} + shift;
  int64_t i = 0;
  for (; i + V::kWidth <= n; i += V::kWidth) {
    const auto d = St::load(x + i) - sh;
    s += d;
    q += d * d;
  }
  T ts = V::sum(s), tq = V::sum(q);
  for (; i < n; ++i) {
    const T d = St::get(x[i]) - shift;
    ts += d;
    tq += d * d;
  }
  sum = ts;
  sq = tq;
}

// Rows [p0, p1): per channel, the sums of (x - shift[c]) and of its square, added to sum/sq (double).
template <typename S, typename T = Compute<S>>
GRASPEXT_INLINE void moments_impl(const S* x, int64_t p0, int64_t p1, int64_t C, int64_t L, const T* shift,
                                  double* sum, double* sq) {
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t c = 0; c < C; ++c) {
      T s, q;
      row_moments(x + (p * C + c) * L, L, shift[c], s, q);
      sum[c] += s;
      sq[c] += q;
    }
}

// y = x * scale[c] + offset[c] (+ residual), then with relu 0 where y < 0 (NaN stays, as in torch.relu).
template <typename S, typename T = Compute<S>>
GRASPEXT_INLINE void normalize_impl(const S* __restrict x, const S* __restrict residual, S* __restrict y, int64_t p0,
                                    int64_t p1, int64_t C, int64_t L, const T* scale, const T* offset, bool relu) {
  using St = Storage<S>;
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t c = 0; c < C; ++c) {
      const T a = scale[c], b = offset[c];
      const int64_t o = (p * C + c) * L;
      if (residual) {
        for (int64_t l = 0; l < L; ++l) {
          const T v = St::get(x[o + l]) * a + b + St::get(residual[o + l]);
          y[o + l] = St::put(relu && v < T(0) ? T(0) : v);
        }
      } else {
        for (int64_t l = 0; l < L; ++l) {
          const T v = St::get(x[o + l]) * a + b;
          y[o + l] = St::put(relu && v < T(0) ? T(0) : v);
        }
      }
    }
}

// Per channel, with g = dy, zero where out <= 0 with relu: sums of g and of g * (x - mean[c]).
template <typename S, typename T = Compute<S>>
GRASPEXT_INLINE void grad_sums_impl(const S* dy, const S* x, const S* out, int64_t p0, int64_t p1, int64_t C,
                                    int64_t L, const T* mean, bool relu, double* sum_g, double* sum_gx) {
  using V = Vec<T>;
  using St = Storage<S>;
  using v_t = typename V::type;
  const v_t zero = {};
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t o = (p * C + c) * L;
      const T m = mean[c];
      const v_t mv = zero + m;
      v_t s = {}, q = {};
      int64_t i = 0;
      for (; i + V::kWidth <= L; i += V::kWidth) {
        v_t g = St::load(dy + o + i);
        if (relu) g = St::load(out + o + i) <= zero ? zero : g;  // as torch: NaN passes
        s += g;
        q += g * (St::load(x + o + i) - mv);
      }
      T ts = V::sum(s), tq = V::sum(q);
      for (; i < L; ++i) {
        const T g = relu && St::get(out[o + i]) <= T(0) ? T(0) : St::get(dy[o + i]);
        ts += g;
        tq += g * (St::get(x[o + i]) - m);
      }
      sum_g[c] += ts;
      sum_gx[c] += tq;
    }
}

// dx = a[c] * g + k[c] * x + b[c] (the BatchNorm input gradient, expanded per channel); dr = g if requested.
template <typename S, typename T = Compute<S>>
GRASPEXT_INLINE void grad_input_impl(const S* __restrict dy, const S* __restrict x, const S* __restrict out,
                                     S* __restrict dx, S* __restrict dr, int64_t p0, int64_t p1, int64_t C,
                                     int64_t L, const T* a, const T* k, const T* b, bool relu) {
  using St = Storage<S>;
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t o = (p * C + c) * L;
      const T ac = a[c], kc = k[c], bc = b[c];
      for (int64_t l = 0; l < L; ++l) {
        const S g = relu && St::get(out[o + l]) <= T(0) ? S(0) : dy[o + l];  // a bfloat16 zero is all zero bits
        dx[o + l] = St::put(ac * St::get(g) + kc * St::get(x[o + l]) + bc);
        if (dr) dr[o + l] = g;
      }
    }
}

// The instruction-set clones, one per storage type (target_clones takes plain functions, not templates).
#define GRASPEXT_DEFINE_KERNELS(S, T, suffix)                                                                  \
  GRASPEXT_CLONES void moments_##suffix(const S* x, int64_t p0, int64_t p1, int64_t C, int64_t L,             \
                                        const T* shift, double* sum, double* sq) {                            \
    moments_impl<S>(x, p0, p1, C, L, shift, sum, sq);                                                         \
  }                                                                                                            \
  GRASPEXT_CLONES void normalize_##suffix(const S* x, const S* r, S* y, int64_t p0, int64_t p1, int64_t C,    \
                                          int64_t L, const T* scale, const T* offset, bool relu) {            \
    normalize_impl<S>(x, r, y, p0, p1, C, L, scale, offset, relu);                                             \
  }                                                                                                            \
  GRASPEXT_CLONES void grad_sums_##suffix(const S* dy, const S* x, const S* out, int64_t p0, int64_t p1,      \
                                          int64_t C, int64_t L, const T* mean, bool relu, double* sum_g,      \
                                          double* sum_gx) {                                                    \
    grad_sums_impl<S>(dy, x, out, p0, p1, C, L, mean, relu, sum_g, sum_gx);                                   \
  }                                                                                                            \
  GRASPEXT_CLONES void grad_input_##suffix(const S* dy, const S* x, const S* out, S* dx, S* dr, int64_t p0,   \
                                           int64_t p1, int64_t C, int64_t L, const T* a, const T* k,          \
                                           const T* b, bool relu) {                                            \
    grad_input_impl<S>(dy, x, out, dx, dr, p0, p1, C, L, a, k, b, relu);                                       \
  }

GRASPEXT_DEFINE_KERNELS(float, float, f32)
GRASPEXT_DEFINE_KERNELS(double, double, f64)
GRASPEXT_DEFINE_KERNELS(uint16_t, float, bf16)
#undef GRASPEXT_DEFINE_KERNELS

// The clone of each kernel for storage type S.
template <typename S, typename T = Compute<S>>
void moments(const S* x, int64_t p0, int64_t p1, int64_t C, int64_t L, const T* shift, double* s, double* q) {
  if constexpr (std::is_same_v<S, float>) moments_f32(x, p0, p1, C, L, shift, s, q);
  else if constexpr (std::is_same_v<S, uint16_t>) moments_bf16(x, p0, p1, C, L, shift, s, q);
  else moments_f64(x, p0, p1, C, L, shift, s, q);
}

template <typename S, typename T = Compute<S>>
void normalize(const S* x, const S* r, S* y, int64_t p0, int64_t p1, int64_t C, int64_t L, const T* a, const T* b,
               bool relu) {
  if constexpr (std::is_same_v<S, float>) normalize_f32(x, r, y, p0, p1, C, L, a, b, relu);
  else if constexpr (std::is_same_v<S, uint16_t>) normalize_bf16(x, r, y, p0, p1, C, L, a, b, relu);
  else normalize_f64(x, r, y, p0, p1, C, L, a, b, relu);
}

template <typename S, typename T = Compute<S>>
void grad_sums(const S* dy, const S* x, const S* out, int64_t p0, int64_t p1, int64_t C, int64_t L, const T* mean,
               bool relu, double* sg, double* sgx) {
  if constexpr (std::is_same_v<S, float>) grad_sums_f32(dy, x, out, p0, p1, C, L, mean, relu, sg, sgx);
  else if constexpr (std::is_same_v<S, uint16_t>) grad_sums_bf16(dy, x, out, p0, p1, C, L, mean, relu, sg, sgx);
  else grad_sums_f64(dy, x, out, p0, p1, C, L, mean, relu, sg, sgx);
}

template <typename S, typename T = Compute<S>>
void input_grad(const S* dy, const S* x, const S* out, S* dx, S* dr, int64_t p0, int64_t p1, int64_t C, int64_t L,
                const T* a, const T* k, const T* b, bool relu) {
  if constexpr (std::is_same_v<S, float>) grad_input_f32(dy, x, out, dx, dr, p0, p1, C, L, a, k, b, relu);
  else if constexpr (std::is_same_v<S, uint16_t>) grad_input_bf16(dy, x, out, dx, dr, p0, p1, C, L, a, k, b, relu);
  else grad_input_f64(dy, x, out, dx, dr, p0, p1, C, L, a, k, b, relu);
}

// The kernels' storage type for an ATen dtype (the same bits), and the dtype of statistics and parameters.
template <typename scalar_t>
struct StorageOf {
  using type = scalar_t;
};
template <>
struct StorageOf<at::BFloat16> {
  using type = uint16_t;
};

// Rows [0, P) in kBlocks nearly equal ranges; block b is [bounds(b), bounds(b + 1)).
int64_t block_bound(int64_t P, int64_t blocks, int64_t b) { return P * b / blocks; }

// Runs fn(p0, p1, sum_a, sum_b) over every block in parallel, each block adding into its own zeroed pair of
// [C] double arrays, then adds the blocks in order: deterministic for any number of threads.
template <typename Fn>
std::pair<std::vector<double>, std::vector<double>> blocked_channel_sums(int64_t P, int64_t C, const Fn& fn) {
  const int64_t blocks = std::min(P, kBlocks);
  std::vector<double> partial(static_cast<size_t>(blocks * 2 * C), 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double* part = partial.data() + b * 2 * C;
      fn(block_bound(P, blocks, b), block_bound(P, blocks, b + 1), part, part + C);
    }
  });
  std::vector<double> a(C, 0.0), s(C, 0.0);
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t c = 0; c < C; ++c) {
      a[c] += partial[b * 2 * C + c];
      s[c] += partial[b * 2 * C + C + c];
    }
  return {std::move(a), std::move(s)};
}

template <typename Fn>
void parallel_rows(int64_t P, int64_t C, int64_t L, const Fn& fn) {
  // About 64 KiB of float32 per task.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, C * L));
  at::parallel_for(0, P, grain, fn);
}

template <typename T>
std::vector<T> channel_values(const std::optional<at::Tensor>& t, int64_t C, T fallback) {
  std::vector<T> out(C, fallback);
  if (t) {
    const auto v = t->to(c10::CppTypeToScalarType<T>::value).contiguous();
    const T* p = v.template const_data_ptr<T>();
    std::copy(p, p + C, out.begin());
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_cpu(const at::Tensor& input,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   const std::optional<at::Tensor>& residual,
                                                                   double eps, bool relu) {
  check_batch_norm_forward_args(input, weight, bias, residual, eps, c10::DeviceType::CPU);
  const auto r = residual ? residual->contiguous() : at::Tensor();
  const int64_t P = input.size(0), C = input.size(1), L = input.size(2);
  const double count = static_cast<double>(P * L);
  auto out = at::empty_like(input);
  auto mean = at::empty({C}, input.options().dtype(batch_norm_stats_dtype(input)));
  auto var = at::empty({C}, input.options().dtype(batch_norm_stats_dtype(input)));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "batch_norm_relu_cpu", [&] {
    using S = typename StorageOf<scalar_t>::type;
    using T = Compute<S>;
    const S* x = reinterpret_cast<const S*>(input.const_data_ptr<scalar_t>());
    // Sums shifted by each channel's first value, so that a large mean does not drown the variance.
    std::vector<T> shift(C);
    for (int64_t c = 0; c < C; ++c) shift[c] = Storage<S>::get(x[c * L]);
    const auto [sum, sq] = blocked_channel_sums(P, C, [&](int64_t p0, int64_t p1, double* s, double* q) {
      moments(x, p0, p1, C, L, shift.data(), s, q);
    });
    const auto w = channel_values<T>(weight, C, 1);
    const auto b = channel_values<T>(bias, C, 0);
    std::vector<T> scale(C), offset(C);
    auto* m = mean.data_ptr<T>();
    auto* v = var.data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) {
      const double d = sum[c] / count;
      const double var_c = std::max(0.0, sq[c] / count - d * d);
      const double mean_c = shift[c] + d;
      const double invstd = 1.0 / std::sqrt(var_c + eps);
      m[c] = static_cast<T>(mean_c);
      v[c] = static_cast<T>(var_c);
      scale[c] = static_cast<T>(w[c] * invstd);
      offset[c] = static_cast<T>(b[c] - mean_c * w[c] * invstd);
    }
    S* y = reinterpret_cast<S*>(out.data_ptr<scalar_t>());
    const S* res = r.defined() ? reinterpret_cast<const S*>(r.const_data_ptr<scalar_t>()) : nullptr;
    parallel_rows(P, C, L, [&](int64_t p0, int64_t p1) {
      normalize(x, res, y, p0, p1, C, L, scale.data(), offset.data(), relu);
    });
  });
  return {out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& out,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& var, double eps, bool relu,
    bool residual_grad) {
  check_batch_norm_backward_args(grad_out, input, out, weight, mean, var, c10::DeviceType::CPU);
  const int64_t P = input.size(0), C = input.size(1), L = input.size(2);
  const double count = static_cast<double>(P * L);
  const auto dy_c = grad_out.contiguous();
  const auto out_c = out.contiguous();
  auto grad_input = at::empty_like(input);
  // Parameter gradients in float32 for bfloat16 activations (the caller casts them to the parameters' dtype).
  auto grad_weight = at::empty({C}, input.options().dtype(batch_norm_stats_dtype(input)));
  auto grad_bias = at::empty({C}, input.options().dtype(batch_norm_stats_dtype(input)));
  auto grad_residual = residual_grad ? at::empty_like(input) : at::empty({0}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "batch_norm_relu_backward_cpu", [&] {
    using S = typename StorageOf<scalar_t>::type;
    using T = Compute<S>;
    const auto data = [](const at::Tensor& t) { return reinterpret_cast<const S*>(t.const_data_ptr<scalar_t>()); };
    const S* x = data(input);
    const S* dy = data(dy_c);
    const S* y = data(out_c);
    const auto m = channel_values<T>(mean, C, 0);
    const auto v = channel_values<T>(var, C, 0);
    const auto w = channel_values<T>(weight, C, 1);
    const auto [sum_g, sum_gx] = blocked_channel_sums(P, C, [&](int64_t p0, int64_t p1, double* s, double* q) {
      grad_sums(dy, x, y, p0, p1, C, L, m.data(), relu, s, q);
    });
    // dx = w * invstd * (g - sum_g / M - xhat * sum(g * xhat) / M), with xhat = (x - mean) * invstd,
    // expanded to a * g + k * x + b per channel.
    std::vector<T> a(C), k(C), b(C);
    auto* gw = grad_weight.data_ptr<T>();
    auto* gb = grad_bias.data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) {
      const double invstd = 1.0 / std::sqrt(static_cast<double>(v[c]) + eps);
      const double sum_g_xhat = sum_gx[c] * invstd;
      const double ac = w[c] * invstd;
      const double kc = -ac * invstd * sum_g_xhat / count;
      a[c] = static_cast<T>(ac);
      k[c] = static_cast<T>(kc);
      b[c] = static_cast<T>(-ac * sum_g[c] / count - kc * m[c]);
      gw[c] = static_cast<T>(sum_g_xhat);
      gb[c] = static_cast<T>(sum_g[c]);
    }
    S* dx = reinterpret_cast<S*>(grad_input.data_ptr<scalar_t>());
    S* dr = residual_grad ? reinterpret_cast<S*>(grad_residual.data_ptr<scalar_t>()) : nullptr;
    parallel_rows(P, C, L, [&](int64_t p0, int64_t p1) {
      input_grad(dy, x, y, dx, dr, p0, p1, C, L, a.data(), k.data(), b.data(), relu);
    });
  });
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(graspext, CPU, m) {
  m.impl("batch_norm_relu", &batch_norm_relu_cpu);
  m.impl("batch_norm_relu_backward", &batch_norm_relu_backward_cpu);
}

}  // namespace graspext::ops
