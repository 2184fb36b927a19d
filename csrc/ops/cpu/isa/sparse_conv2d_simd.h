// Sparse convolution kernels over a SIMD vector of GRASPEXT_VEC_BYTES bytes, compiled once per instruction
// set by the files beside this one (see sparse_conv2d_kernels.h for what the products compute).
//
// The including file first defines GRASPEXT_ISA (the namespace), GRASPEXT_VEC_BYTES and GRASPEXT_FMA (and
// GRASPEXT_DPBF16, the bfloat16 pair dot product, where the ISA has one), then switches the target with
// `#pragma GCC target`. No library header may be included after that: an inline library function
// instantiated here could be emitted with, say, AVX-512 instructions and then be picked by the linker for
// every caller, which would crash CPUs without them. Everything below is in a namespace
// of its own per instruction set for the same reason.
//
// Register tiles: kPos consecutive output positions times kVecs vectors of the batch. A pixel of one
// channel is `batch` contiguous values (the next column's are `pixel` elements on), so a tile as wide as the
// batch reads whole cache lines and no line is fetched twice; the position count then fills the register
// file (accumulators: 16 of AVX-512's 32 registers, 8 of the 16 that AVX2 and SSE have). A bfloat16 vector
// widens to two float32 registers, so its tiles hold half as many vectors (of twice the samples).

namespace graspext::cpu::GRASPEXT_ISA {

template <typename T>
struct Vec {
  static constexpr int kWidth = GRASPEXT_VEC_BYTES / sizeof(T);  // image values per vector
  static constexpr int kRegisters = 1;                            // registers one vector occupies
  typedef T type __attribute__((vector_size(GRASPEXT_VEC_BYTES)));
  typedef T unaligned __attribute__((vector_size(GRASPEXT_VEC_BYTES), aligned(sizeof(T)), may_alias));

  static inline type load(const T* p) { return *reinterpret_cast<const unaligned*>(p); }
  static inline void store(T* p, type v) { *reinterpret_cast<unaligned*>(p) = v; }
  // First n lanes only; the others read as zero. Used at the end of the batch, where a full load would
  // read past the tensor.
  static inline type load_first(const T* p, int n) {
    type v = {};
    for (int i = 0; i < n; ++i) v[i] = p[i];
    return v;
  }
  static inline void store_first(T* p, type v, int n) {
    for (int i = 0; i < n; ++i) p[i] = v[i];
  }
  static inline type splat(T x) { return type{} + x; }
  static inline type fma(type a, type b, type c) { return GRASPEXT_FMA(a, b, c); }
  static inline type add(type a, type b) { return a + b; }
  static inline T sum(type v) {
    T s = 0;
    for (int i = 0; i < kWidth; ++i) s += v[i];
    return s;
  }

  // Dot products over the batch (the weight gradient): both operands are loaded as `held` vectors
  // (kHeldRegisters registers each) and multiplied into a `dot_acc`, whose folded form (a vector of the
  // compute type) is the partial sum kept between tiles.
  static constexpr int kHeldRegisters = 1;
  static constexpr int kDotRegisters = 1;
  using held = type;
  using dot_acc = type;
  static inline held hold(const T* p) { return load(p); }
  static inline held hold_first(const T* p, int n) { return load_first(p, n); }
  static inline dot_acc dot(dot_acc acc, held a, held b) { return fma(a, b, acc); }
  static inline type fold(dot_acc v) { return v; }
};

// bfloat16 images: one vector is a register of bfloat16 values (twice the float32 count, so one cache line
// feeds twice the multiply-adds), widened to two float32 registers on load. Widening needs no shuffle: a
// 32-bit word holds two consecutive samples, and the even one shifted up (the odd one masked) is its
// float32 value. So `even` holds samples 0, 2, 4, ... and `odd` samples 1, 3, 5, ...; a store rounds both
// back (to nearest even, as c10::BFloat16) and interleaves them into words again. Dot products over the
// batch (the weight gradient) sum both halves, in whatever order.
template <>
struct Vec<Bf16> {
  using F = Vec<float>;
  static constexpr int kWidth = 2 * F::kWidth;
  static constexpr int kRegisters = 2;
  typedef uint32_t words __attribute__((vector_size(GRASPEXT_VEC_BYTES)));
  typedef uint32_t words_unaligned __attribute__((vector_size(GRASPEXT_VEC_BYTES), aligned(2), may_alias));
  struct type {
    F::type even, odd;
  };

  static inline type widen(words u) { return {(F::type)(u << 16), (F::type)(u & 0xffff0000u)}; }
  // The bfloat16 of each lane in the upper half of its word: round to nearest even; NaN becomes 0x7FC0.
  static inline words round_upper(F::type x) {
    const words u = (words)x;
    const words rounded = u + 0x7fffu + ((u >> 16) & 1u);
    const words nan = (words)(x != x);
    return ((rounded & ~nan) | (0x7fc00000u & nan)) & 0xffff0000u;
  }
  static inline words narrow(type v) { return (round_upper(v.even) >> 16) | round_upper(v.odd); }

  static inline type load(const Bf16* p) { return widen(*reinterpret_cast<const words_unaligned*>(p)); }
  static inline void store(Bf16* p, type v) { *reinterpret_cast<words_unaligned*>(p) = narrow(v); }
  static inline type load_first(const Bf16* p, int n) {
    alignas(64) Bf16 tmp[kWidth] = {};
    for (int i = 0; i < n; ++i) tmp[i] = p[i];
    return load(tmp);
  }
  static inline void store_first(Bf16* p, type v, int n) {
    alignas(64) Bf16 tmp[kWidth];
    store(tmp, v);
    for (int i = 0; i < n; ++i) p[i] = tmp[i];
  }
  static inline type splat(float x) { return {F::splat(x), F::splat(x)}; }
  static inline type fma(type a, type b, type c) {
    return {F::fma(a.even, b.even, c.even), F::fma(a.odd, b.odd, c.odd)};
  }
  static inline type add(type a, type b) { return {a.even + b.even, a.odd + b.odd}; }
  static inline float sum(type v) { return F::sum(v.even + v.odd); }

#ifdef GRASPEXT_DPBF16
  // vdpbf16ps multiplies the bfloat16 pairs of two words and adds both products into a float32 lane: pairs
  // along the batch, exactly what a dot product over the batch needs, so nothing is widened. (Like the
  // instruction, it treats denormal inputs and results as zero.)
  static constexpr int kHeldRegisters = 1;
  static constexpr int kDotRegisters = 1;
  using held = words;
  using dot_acc = F::type;
  static inline held hold(const Bf16* p) { return *reinterpret_cast<const words_unaligned*>(p); }
  static inline held hold_first(const Bf16* p, int n) {
    alignas(64) Bf16 tmp[kWidth] = {};
    for (int i = 0; i < n; ++i) tmp[i] = p[i];
    return hold(tmp);
  }
  static inline dot_acc dot(dot_acc acc, held a, held b) { return GRASPEXT_DPBF16(acc, a, b); }
  static inline F::type fold(dot_acc v) { return v; }
#else
  static constexpr int kHeldRegisters = 2;
  static constexpr int kDotRegisters = 2;
  using held = type;
  using dot_acc = type;
  static inline held hold(const Bf16* p) { return load(p); }
  static inline held hold_first(const Bf16* p, int n) { return load_first(p, n); }
  static inline dot_acc dot(dot_acc acc, held a, held b) { return fma(a, b, acc); }
  // Even and odd samples add up alike: a partial sum needs one register, not two.
  static inline F::type fold(dot_acc v) { return v.even + v.odd; }
#endif
};

// Accumulator registers of a tile; a tile of T holds kAccumulators / Vec<T>::kRegisters vectors.
constexpr int kAccumulators = GRASPEXT_VEC_BYTES >= 64 ? 16 : 8;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Taps that fall into the padding read this block instead of branching: which taps do, at the image
// border, is as unpredictable as the mask, and a mispredicted branch costs more than the wasted FMAs.
template <typename T>
struct ZeroBlock {
  alignas(64) static constexpr T values[kAccumulators * GRASPEXT_VEC_BYTES / sizeof(T)] = {};
};

// The batch range [n, n + count) of one tile: `nvec` vectors, the last holding `lanes` values.
struct BatchTile {
  int nvec;
  int lanes;
};

template <typename T>
inline BatchTile batch_tile(int64_t count) {
  constexpr int W = Vec<T>::kWidth;
  const int nvec = static_cast<int>((count + W - 1) / W);
  return {nvec, static_cast<int>(count - static_cast<int64_t>(nvec - 1) * W)};
}

template <typename T, bool kFull>
inline typename Vec<T>::type load_block(const T* p, int b, BatchTile t) {
  using V = Vec<T>;
  if (kFull || b < t.nvec - 1 || t.lanes == V::kWidth) return V::load(p + b * V::kWidth);
  return V::load_first(p + b * V::kWidth, t.lanes);
}

template <typename T, bool kFull>
inline typename Vec<T>::held hold_block(const T* p, int b, BatchTile t) {
  using V = Vec<T>;
  if (kFull || b < t.nvec - 1 || t.lanes == V::kWidth) return V::hold(p + b * V::kWidth);
  return V::hold_first(p + b * V::kWidth, t.lanes);
}

template <typename T, bool kFull>
inline void store_block(T* p, int b, BatchTile t, typename Vec<T>::type v) {
  using V = Vec<T>;
  if (kFull || b < t.nvec - 1 || t.lanes == V::kWidth) {
    V::store(p + b * V::kWidth, v);
  } else {
    V::store_first(p + b * V::kWidth, v, t.lanes);
  }
}

// Fills `taps` with the entries of `row` whose kernel row lands inside the source for destination row y,
// with the offset of their source row. Returns how many. `values` is null for the weight gradient.
// With `rows_direct` there is nothing to filter: the taps are the decoded arrays themselves, from the
// row's first entry, and the caller adds y's row offset to the source pointer instead.
template <typename T>
inline int64_t collect_row_taps(const int64_t* row_ptr, const int64_t* tap_base, const int32_t* tap_r,
                                const int32_t* tap_s, const compute_t<T>* values, int64_t row, int64_t y, int64_t dst_h,
                                int64_t src_row_stride, const int32_t* row_map, const TapScratch<T>& taps) {
  // Branch-free compaction: whether a tap is in bounds follows no pattern the predictor could learn.
  int64_t n = 0;
  for (int64_t e = row_ptr[row]; e < row_ptr[row + 1]; ++e) {
    const int32_t sy = row_map[tap_r[e] * dst_h + y];
    taps.offset[n] = tap_base[e] + static_cast<int64_t>(sy) * src_row_stride;
    taps.col[n] = tap_s[e];
    taps.entry[n] = static_cast<int32_t>(e);
    if (values) taps.weight[n] = values[e];
    n += sy >= 0;
  }
  return n;
}

// ---- Gather product (forward and input gradient) -------------------------------------------------

// Whether every tap column s reads positions x0 .. x0 + kPos - 1 inside the source at a constant step: then
// a tile needs one map lookup per tap instead of one per position, and no bounds test.
inline bool tile_is_interior(const int32_t* col_map, int64_t kernel_w, int64_t dst_w, int64_t x0, int npos,
                             int kPos, int64_t step) {
  if (npos != kPos || step == 0) return false;
  for (int64_t s = 0; s < kernel_w; ++s) {
    const int32_t first = col_map[s * dst_w + x0];
    const int32_t last = col_map[s * dst_w + x0 + kPos - 1];
    if (first < 0 || last < 0 || last - first != (kPos - 1) * step) return false;
  }
  return true;
}

// The source pixel position p of a tile reads through one tap (`cmap` is the tap column's map from x0 on):
// the zero block where it falls into the padding.
template <typename T, bool kInterior>
inline const T* tap_pixel(const T* src_row, const int32_t* cmap, int p, int64_t pixel, int64_t step) {
  if constexpr (kInterior) return src_row + (static_cast<int64_t>(cmap[0]) + p * step) * pixel;
  const int32_t sx = cmap[p];
  return sx >= 0 ? src_row + static_cast<int64_t>(sx) * pixel : ZeroBlock<T>::values;
}

// One tile of destination row y: positions x0 .. x0 + npos - 1 (npos <= kPos) and one batch tile. With
// kInterior (tile_is_interior), position p reads source column cmap[0] + p * step.
template <typename T, int kPos, int kVecs, bool kFull, bool kInterior>
inline void gather_tile(const T* src, int64_t src_pixel, const TapScratch<T>& taps, int64_t ntaps,
                        const int32_t* col_map, int64_t dst_w, int64_t x0, int npos, int64_t step, BatchTile bt,
                        compute_t<T> bias, T* dst, int64_t dst_pixel) {
  using V = Vec<T>;
  using v_t = typename V::type;
  v_t acc[kPos][kVecs];
#pragma GCC unroll 16
  for (int p = 0; p < kPos; ++p)
#pragma GCC unroll 16
    for (int b = 0; b < kVecs; ++b) acc[p][b] = V::splat(bias);

  for (int64_t j = 0; j < ntaps; ++j) {
    const v_t w = V::splat(taps.weight[j]);
    const T* src_row = src + taps.offset[j];
    const int32_t* cmap = col_map + static_cast<int64_t>(taps.col[j]) * dst_w + x0;
#pragma GCC unroll 16
    for (int p = 0; p < kPos; ++p) {
      if (!kInterior && p >= npos) break;
      const T* px = tap_pixel<T, kInterior>(src_row, cmap, p, src_pixel, step);
#pragma GCC unroll 16
      for (int b = 0; b < kVecs; ++b) {
        if (!kFull && b >= bt.nvec) break;
        acc[p][b] = V::fma(w, load_block<T, kFull>(px, b, bt), acc[p][b]);
      }
    }
  }

#pragma GCC unroll 16
  for (int p = 0; p < kPos; ++p) {
    if (p >= npos) break;
    T* out = dst + (x0 + p) * dst_pixel;
#pragma GCC unroll 16
    for (int b = 0; b < kVecs; ++b) {
      if (!kFull && b >= bt.nvec) break;
      store_block<T, kFull>(out, b, bt, acc[p][b]);
    }
  }
}

template <typename T, int kPos, int kVecs>
void gather_items(const GatherConvArgs<T>& a, CacheBlocking blk, int64_t item_begin, int64_t item_end,
                  TapScratch<T> taps) {
  constexpr int64_t kTile = kVecs * Vec<T>::kWidth;
  const int64_t src_row_stride = a.src_strides.row;
  const int64_t x_blocks = (a.dst_w + blk.x_block - 1) / blk.x_block;
  for (int64_t item = item_begin; item < item_end; ++item) {
    int64_t rest = item;
    const int64_t row = rest % a.dst_rows;
    rest /= a.dst_rows;
    const int64_t xb = rest % x_blocks;
    rest /= x_blocks;
    const int64_t y = rest % a.dst_h;
    const int64_t chunk = rest / a.dst_h;
    const T* src = a.src;
    int64_t ntaps;
    TapScratch<T> row_taps = taps;
    if (a.rows_direct) {
      const int64_t e0 = a.row_ptr[row];
      ntaps = a.row_ptr[row + 1] - e0;
      row_taps.offset = const_cast<int64_t*>(a.tap_base + e0);
      row_taps.col = const_cast<int32_t*>(a.tap_s + e0);
      row_taps.weight = const_cast<compute_t<T>*>(a.values + e0);
      src += y * src_row_stride;
    } else {
      ntaps = collect_row_taps(a.row_ptr, a.tap_base, a.tap_r, a.tap_s, a.values, row, y, a.dst_h, src_row_stride,
                               a.row_map, taps);
    }
    const compute_t<T> bias = a.bias ? a.bias[row] : compute_t<T>(0);
    T* dst_row = a.dst + row * a.dst_strides.channel + y * a.dst_strides.row;
    const int64_t n_end = min64(a.batch, (chunk + 1) * blk.batch_chunk);
    const int64_t x_end = min64(a.dst_w, (xb + 1) * blk.x_block);
    for (int64_t n = chunk * blk.batch_chunk; n < n_end; n += kTile) {
      const int64_t count = min64(kTile, n_end - n);
      const BatchTile bt = batch_tile<T>(count);
      for (int64_t x0 = xb * blk.x_block; x0 < x_end; x0 += kPos) {
        const int npos = static_cast<int>(min64(kPos, x_end - x0));
        const bool interior = tile_is_interior(a.col_map, a.kernel_w, a.dst_w, x0, npos, kPos, a.col_step);
        const T* s_n = src + n;
        T* d_n = dst_row + n;
        const int64_t sp = a.src_strides.pixel, dp = a.dst_strides.pixel;
        if (count == kTile && interior) {
          gather_tile<T, kPos, kVecs, true, true>(s_n, sp, row_taps, ntaps, a.col_map, a.dst_w, x0, npos, a.col_step,
                                                  bt, bias, d_n, dp);
        } else if (count == kTile) {
          gather_tile<T, kPos, kVecs, true, false>(s_n, sp, row_taps, ntaps, a.col_map, a.dst_w, x0, npos, a.col_step,
                                                   bt, bias, d_n, dp);
        } else {
          gather_tile<T, kPos, kVecs, false, false>(s_n, sp, row_taps, ntaps, a.col_map, a.dst_w, x0, npos,
                                                    a.col_step, bt, bias, d_n, dp);
        }
      }
    }
  }
}

// Picks the register tile for `batch` values per pixel (one block's batch chunk) and rows `width` positions
// wide, and calls kernel.run<kPos, kVecs>(): as many batch vectors as the chunk fills (so the fast, unmasked
// tile applies), then positions along x for the rest of the accumulators.
template <int R, int kVecs, typename Kernel>
inline void with_positions(int64_t width, Kernel& kernel) {
  constexpr int kMaxPos = R / kVecs;
  if constexpr (kMaxPos >= 8) {
    if (width >= 8) return kernel.template run<8, kVecs>();
  }
  if constexpr (kMaxPos >= 4) {
    if (width >= 4) return kernel.template run<4, kVecs>();
  }
  if constexpr (kMaxPos >= 2) {
    if (width >= 2) return kernel.template run<2, kVecs>();
  }
  kernel.template run<1, kVecs>();
}

// R: the vectors a tile may hold (the accumulator registers over the registers per vector).
template <typename T, int R, typename Kernel>
inline void with_tile(int64_t batch, int64_t width, Kernel&& kernel) {
  constexpr int W = Vec<T>::kWidth;
  const int64_t vectors = (batch + W - 1) / W;
  if (vectors >= R) {
    with_positions<R, R>(width, kernel);
  } else if (vectors >= R / 2) {
    with_positions<R, R / 2>(width, kernel);
  } else if (vectors >= R / 4) {
    with_positions<R, R / 4>(width, kernel);
  } else {
    // At least one vector: a 4-vector tile (bfloat16 on 16-register ISAs) has no eighth.
    with_positions<R, (R >= 8 ? R / 8 : 1)>(width, kernel);
  }
}

template <typename T>
struct GatherLauncher {
  const GatherConvArgs<T>& a;
  CacheBlocking blk;
  int64_t begin, end;
  TapScratch<T> taps;
  template <int kPos, int kVecs>
  void run() {
    gather_items<T, kPos, kVecs>(a, blk, begin, end, taps);
  }
};

template <typename T>
void gather(const GatherConvArgs<T>& a, CacheBlocking blk, int64_t item_begin, int64_t item_end,
            TapScratch<T> taps) {
  with_tile<T, kAccumulators / Vec<T>::kRegisters>(min64(a.batch, blk.batch_chunk), min64(a.dst_w, blk.x_block),
               GatherLauncher<T>{a, blk, item_begin, item_end, taps});
}

// ---- Sampled product (weight gradient) ---------------------------------------------------------------

template <typename T, int kPos, int kVecs, bool kFull, bool kInterior>
inline void sddmm_tile(const T* go, int64_t go_pixel, const T* in, int64_t in_pixel, const TapScratch<T>& taps,
                       int64_t ntaps, const int32_t* col_map, int64_t out_w, int64_t x0, int npos, int64_t step,
                       BatchTile bt, typename Vec<compute_t<T>>::type* partial, bool single_pass) {
  using V = Vec<T>;
  using h_t = typename V::held;
  using a_t = typename V::dot_acc;
  constexpr int kMaxAcc = 4 / V::kDotRegisters;
  constexpr int kAcc = kVecs < kMaxAcc ? kVecs : kMaxAcc;
  // The grad_output tile stays in registers while every tap of the row streams its input pixels past it.
  h_t g[kPos][kVecs];
#pragma GCC unroll 16
  for (int p = 0; p < kPos; ++p)
#pragma GCC unroll 16
    for (int b = 0; b < kVecs; ++b) {
      g[p][b] = h_t{};
      if (p < npos && (kFull || b < bt.nvec)) g[p][b] = hold_block<T, kFull>(go + (x0 + p) * go_pixel, b, bt);
    }

  for (int64_t j = 0; j < ntaps; ++j) {
    const T* in_row = in + taps.offset[j];
    const int32_t* cmap = col_map + static_cast<int64_t>(taps.col[j]) * out_w + x0;
    a_t acc[kAcc];
#pragma GCC unroll 16
    for (int b = 0; b < kAcc; ++b) acc[b] = a_t{};
#pragma GCC unroll 16
    for (int p = 0; p < kPos; ++p) {
      if (!kInterior && p >= npos) break;
      const T* px = tap_pixel<T, kInterior>(in_row, cmap, p, in_pixel, step);
#pragma GCC unroll 16
      for (int b = 0; b < kVecs; ++b) {
        if (!kFull && b >= bt.nvec) break;
        acc[b % kAcc] = V::dot(acc[b % kAcc], g[p][b], hold_block<T, kFull>(px, b, bt));
      }
    }
    auto total = V::fold(acc[0]);
#pragma GCC unroll 16
    for (int b = 1; b < kAcc; ++b) total += V::fold(acc[b]);
    const int64_t e = taps.entry ? taps.entry[j] : j;
    if (single_pass) {
      reinterpret_cast<compute_t<T>*>(partial)[e] = Vec<compute_t<T>>::sum(total);
    } else {
      partial[e] += total;
    }
  }
}

template <typename T, int kPos, int kVecs>
void sddmm_rows(const SddmmConvArgs<T>& a, CacheBlocking blk, int64_t row_begin, int64_t row_end,
                TapScratch<T> taps, compute_t<T>* partial_storage) {
  using V = Vec<T>;
  using v_t = typename V::type;
  constexpr int64_t kTile = kVecs * V::kWidth;
  const int64_t e_begin = a.row_ptr[row_begin];
  const int64_t e_end = a.row_ptr[row_end];
  const int64_t in_row_stride = a.in_strides.row;
  // Partial sums are vectors of the compute type (a bfloat16 tile's two halves fold into one).
  using P = Vec<compute_t<T>>;
  using p_t = typename P::type;
  p_t* partial = reinterpret_cast<p_t*>(partial_storage);
  // One tile covers each whole dot product (a linear layer whose batch fits the tile): the sums go straight
  // to grad_values. Otherwise each entry's vector of partial sums waits in `partial` between tiles.
  const bool single_pass = a.out_h == 1 && a.out_w <= kPos && a.batch <= kTile;
  if (single_pass) partial = reinterpret_cast<p_t*>(a.grad_values + e_begin);
  for (int64_t e = 0; !single_pass && e < e_end - e_begin; ++e) partial[e] = P::splat(compute_t<T>(0));
  // Blocks (batch chunk, y, x block) outermost, channels inside: consecutive channels read the same input
  // pixels, which stay in cache; each entry's partial sum waits in `partial` meanwhile.
  for (int64_t n_begin = 0; n_begin < a.batch; n_begin += blk.batch_chunk) {
    const int64_t n_end = min64(a.batch, n_begin + blk.batch_chunk);
    for (int64_t y = 0; y < a.out_h; ++y) {
      for (int64_t xb = 0; xb < a.out_w; xb += blk.x_block) {
        const int64_t x_end = min64(a.out_w, xb + blk.x_block);
        for (int64_t row = row_begin; row < row_end; ++row) {
          const T* input = a.input;
          p_t* row_partial = partial;
          int64_t ntaps;
          TapScratch<T> row_taps = taps;
          if (a.rows_direct) {
            const int64_t e0 = a.row_ptr[row];
            ntaps = a.row_ptr[row + 1] - e0;
            row_taps.offset = const_cast<int64_t*>(a.tap_base + e0);
            row_taps.col = const_cast<int32_t*>(a.tap_s + e0);
            row_taps.entry = nullptr;  // entry j is the row's j-th
            row_partial = single_pass ? reinterpret_cast<p_t*>(a.grad_values + e0) : row_partial + (e0 - e_begin);
            input += y * in_row_stride;
          } else {
            ntaps = collect_row_taps<T>(a.row_ptr, a.tap_base, a.tap_r, a.tap_s, nullptr, row, y, a.out_h,
                                        in_row_stride, a.row_map, taps);
            for (int64_t j = 0; j < ntaps; ++j) taps.entry[j] -= static_cast<int32_t>(e_begin);
          }
          if (ntaps == 0) continue;
          const T* go_row = a.grad_output + row * a.go_strides.channel + y * a.go_strides.row;
          for (int64_t n = n_begin; n < n_end; n += kTile) {
            const int64_t count = min64(kTile, n_end - n);
            const BatchTile bt = batch_tile<T>(count);
            for (int64_t x0 = xb; x0 < x_end; x0 += kPos) {
              const int npos = static_cast<int>(min64(kPos, x_end - x0));
              const bool interior = tile_is_interior(a.col_map, a.kernel_w, a.out_w, x0, npos, kPos, a.col_step);
              const T* go = go_row + n;
              const T* in = input + n;
              const int64_t gp = a.go_strides.pixel, ip = a.in_strides.pixel;
              if (count == kTile && interior) {
                sddmm_tile<T, kPos, kVecs, true, true>(go, gp, in, ip, row_taps, ntaps, a.col_map, a.out_w, x0, npos,
                                                       a.col_step, bt, row_partial, single_pass);
              } else if (count == kTile) {
                sddmm_tile<T, kPos, kVecs, true, false>(go, gp, in, ip, row_taps, ntaps, a.col_map, a.out_w, x0, npos,
                                                        a.col_step, bt, row_partial, single_pass);
              } else {
                sddmm_tile<T, kPos, kVecs, false, false>(go, gp, in, ip, row_taps, ntaps, a.col_map, a.out_w, x0,
                                                         npos, a.col_step, bt, row_partial, single_pass);
              }
            }
          }
        }
      }
    }
  }
  for (int64_t e = e_begin; !single_pass && e < e_end; ++e) a.grad_values[e] = P::sum(partial[e - e_begin]);
}

template <typename T>
struct SddmmLauncher {
  const SddmmConvArgs<T>& a;
  CacheBlocking blk;
  int64_t begin, end;
  TapScratch<T> taps;
  compute_t<T>* partial;
  template <int kPos, int kVecs>
  void run() {
    sddmm_rows<T, kPos, kVecs>(a, blk, begin, end, taps, partial);
  }
};

template <typename T>
void sddmm(const SddmmConvArgs<T>& a, CacheBlocking blk, int64_t row_begin, int64_t row_end, TapScratch<T> taps,
           compute_t<T>* partial) {
  with_tile<T, kAccumulators / Vec<T>::kHeldRegisters>(min64(a.batch, blk.batch_chunk), min64(a.out_w, blk.x_block),
               SddmmLauncher<T>{a, blk, row_begin, row_end, taps, partial});
}

inline const SparseConvKernels* kernels() {
  static const SparseConvKernels table{GRASPEXT_ISA_NAME, GRASPEXT_VEC_BYTES, &gather<float>, &gather<double>,
                                       &sddmm<float>, &sddmm<double>, &gather<Bf16>, &sddmm<Bf16>};
  return &table;
}

}  // namespace graspext::cpu::GRASPEXT_ISA
