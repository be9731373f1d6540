// ndrope's CPU rotary kernels: one pass over x per call, float math, OpenMP over rows.
//
// Memory traffic decides the speed. x is read once and written once; each row of the cos/sin tables
// is applied to up to 4 rows that share it (batch, heads) while it sits in L1, since reading it from
// L2/L3 once per x row costs as much as x itself in bfloat16. Pair loops are unrolled for P = 16, 32,
// 64, and bfloat16 rounds with one instruction where the CPU has AVX512-BF16.
//
// Plain C ABI, no torch headers (so the build takes a few seconds with the system compiler). Python
// (ndrope/_kernel.py) describes each call in one `RotaryCall` struct, mirrored there as a
// ctypes.Structure. Both sides check that they agree before the library is used: the ABI version,
// sizeof(RotaryCall) and the offset of every field (`ndrope_abi`); every entry point re-checks the
// version, the operand count and the ranks, and returns a status code instead of touching memory
// it was not given.
//
// Channel pairs: layout "half" rotates (j, j + P), "interleaved" rotates (2j, 2j + 1):
//   half:        [x0 .. x_{P-1} | x_P .. x_{2P-1}] -> [x0 c0 - x_P s0 .. | x_P c0 + x0 s0 ..]
//   interleaved: [x0 x1 x2 x3 ..]                  -> [x0 c0 - x1 s0, x1 c0 + x0 s0, x2 c1 - x3 s1, ..]

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <omp.h>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace {

constexpr int kMaxDims = 16;

// Storage <-> compute conversions. bfloat16 goes through its bits so that the loops vectorise.
struct bf16 { uint16_t bits; };
template <typename C> inline C load(float v) { return static_cast<C>(v); }
template <typename C> inline C load(double v) { return static_cast<C>(v); }
template <typename C> inline C load(_Float16 v) { return static_cast<C>(static_cast<float>(v)); }
template <typename C> inline C load(bf16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.bits) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return static_cast<C>(out);
}
template <typename T, typename C> inline T store(C v) { return static_cast<T>(v); }
template <> inline _Float16 store<_Float16, double>(double v) { return static_cast<_Float16>(static_cast<float>(v)); }
template <> inline bf16 store<bf16, float>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);  // to nearest even
  return bf16{v != v ? uint16_t(0x7FC0) : rounded};
}
template <> inline bf16 store<bf16, double>(double v) { return store<bf16, float>(static_cast<float>(v)); }

// An index space over some of the row dims (x.shape[:-1]) that Ops operands walk with their own
// element strides (stride 0 where an operand is broadcast). Size-1 dims are dropped and
// contiguous runs merged, so a contiguous tensor is a single dim.
template <int Ops>
struct Rows {
  int ndim = 0;
  int64_t count = 1;
  int64_t size[kMaxDims];
  int64_t stride[Ops][kMaxDims];

  // keep[d] selects the dims of this space (nullptr: all of them)
  Rows(int64_t dims, const int64_t* sizes, const int64_t* const (&strides)[Ops], const bool* keep) {
    for (int64_t d = 0; d < dims; ++d) {
      if ((keep && !keep[d]) || sizes[d] == 1) continue;
      count *= sizes[d];
      const int k = ndim;
      bool merge = k > 0;
      for (int o = 0; o < Ops && merge; ++o) merge = stride[o][k - 1] == strides[o][d] * sizes[d];
      const int at = merge ? k - 1 : k;
      size[at] = merge ? size[at] * sizes[d] : sizes[d];
      for (int o = 0; o < Ops; ++o) stride[o][at] = strides[o][d];
      ndim = at + 1;
    }
  }

  // Calls fn(offsets, n) for rows [begin, end) in runs of n consecutive rows of the innermost dim
  // (offsets of the run's first row; the next row of the run is at offsets + stride[o][ndim - 1]).
  template <typename Fn>
  void walk(int64_t begin, int64_t end, const Fn& fn) const {
    if (ndim == 0) {
      if (begin < end) fn(static_cast<const int64_t*>(zero_), int64_t(1));
      return;
    }
    int64_t index[kMaxDims];
    int64_t offset[Ops] = {};
    int64_t rest = begin;
    for (int d = ndim - 1; d >= 0; --d) {
      index[d] = rest % size[d];
      rest /= size[d];
      for (int o = 0; o < Ops; ++o) offset[o] += index[d] * stride[o][d];
    }
    const int inner = ndim - 1;
    for (int64_t r = begin; r < end;) {
      const int64_t run = size[inner] - index[inner] < end - r ? size[inner] - index[inner] : end - r;
      fn(static_cast<const int64_t*>(offset), run);
      r += run;
      for (int o = 0; o < Ops; ++o) offset[o] += run * stride[o][inner];
      index[inner] += run;
      for (int d = inner; d >= 0 && index[d] == size[d]; --d) {  // carry, odometer style
        for (int o = 0; o < Ops; ++o) offset[o] -= size[d] * stride[o][d];
        index[d] = 0;
        if (d == 0) break;
        ++index[d - 1];
        for (int o = 0; o < Ops; ++o) offset[o] += stride[o][d - 1];
      }
    }
  }
  // offset[o] of row `index` (0 <= index < count) for each operand
  void offsets(int64_t index, int64_t* offset) const {
    for (int o = 0; o < Ops; ++o) offset[o] = 0;
    for (int d = ndim - 1; d >= 0; --d) {
      const int64_t i = index % size[d];
      index /= size[d];
      for (int o = 0; o < Ops; ++o) offset[o] += i * stride[o][d];
    }
  }
  // the step between consecutive rows of a run, per operand
  int64_t step(int o) const { return ndim > 0 ? stride[o][ndim - 1] : 0; }

 private:
  int64_t zero_[Ops] = {};
};

// Splits [0, count) evenly over the threads, as at::parallel_for does; serial for small work.
template <typename Fn>
void parallel_rows(int64_t count, int64_t work, int threads, const Fn& fn) {
  const bool parallel = threads > 1 && count > 1 && work >= 32768;  // below that the fork costs more
#pragma omp parallel num_threads(threads) if (parallel)
  {
    const int64_t teams = omp_get_num_threads(), team = omp_get_thread_num();
    const int64_t chunk = (count + teams - 1) / teams;
    const int64_t begin = team * chunk, end = begin + chunk < count ? begin + chunk : count;
    if (begin < end) fn(begin, end);
  }
}

// Channel pairs: half layout (j, j + P), interleaved (2j, 2j + 1).
template <bool Interleaved> inline int64_t first(int64_t j, int64_t) { return Interleaved ? 2 * j : j; }
template <bool Interleaved> inline int64_t second(int64_t j, int64_t pairs) {
  return Interleaved ? 2 * j + 1 : j + pairs;
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define NDROPE_NATIVE_BF16 1
#endif

#ifdef NDROPE_NATIVE_BF16
// bfloat16 rows with AVX512-BF16: vcvtne2ps2bf16 rounds 32 floats to nearest even in one instruction,
// where the portable loop spends about 8 integer operations per 16 values (the bulk of its time). Like
// every use of that instruction it flushes results below 2^-126 (bfloat16 subnormals) to zero.
inline __m512 widen(__m256i bits) {  // 16 bfloat16 -> 16 float (exact)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// 16 pairs of the tables, in registers, ready for any number of rows: rows sharing a table row
// (batch, heads) load it and arrange it once. Fewer than 16 pairs (left < 16): masked loads and stores.
struct Bf16Chunk {
  __m512 c0, c1, s0, s1;  // half: c, s. interleaved: c and +-s spread over pairs, lanes 0-15 and 16-31
  __mmask16 m16;
  __mmask32 m32;
  bool full;
};

template <bool Interleaved>
inline Bf16Chunk bf16_chunk(const float* cos, const float* sin, __m512 sign, int64_t left) {
  Bf16Chunk t;  // c1, s1 stay unset in the half layout (unused there)
  t.full = left >= 16;
  t.m16 = t.full ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
  t.m32 = t.full ? __mmask32(0xFFFFFFFFu) : __mmask32((uint64_t(1) << (2 * left)) - 1);
  const __m512 c = t.full ? _mm512_loadu_ps(cos) : _mm512_maskz_loadu_ps(t.m16, cos);
  const __m512 s = _mm512_mul_ps(t.full ? _mm512_loadu_ps(sin) : _mm512_maskz_loadu_ps(t.m16, sin), sign);
  if constexpr (!Interleaved) {
    t.c0 = c;
    t.s0 = s;
  } else {
    const __m512i first = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i second = _mm512_set_epi32(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);
    const __mmask16 even = 0x5555;  // the first member of each pair gets -x_b s, the second +x_a s
    const __m512 zero = _mm512_setzero_ps();
    t.c0 = _mm512_permutexvar_ps(first, c);
    t.c1 = _mm512_permutexvar_ps(second, c);
    const __m512 s_lo = _mm512_permutexvar_ps(first, s), s_hi = _mm512_permutexvar_ps(second, s);
    t.s0 = _mm512_mask_sub_ps(s_lo, even, zero, s_lo);
    t.s1 = _mm512_mask_sub_ps(s_hi, even, zero, s_hi);
  }
  return t;
}

// Rotates the chunk's pairs of one row: x, out point at the chunk's first channel (half: of x_a).
template <bool Interleaved>
inline void bf16_apply(const Bf16Chunk& t, const bf16* __restrict__ x, bf16* __restrict__ out, int64_t pairs) {
  if constexpr (!Interleaved) {  // pairs (j, j + P): two runs of 16 channels
    const __m256i a_bits = t.full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))
                                  : _mm256_maskz_loadu_epi16(t.m16, x);
    const __m256i b_bits = t.full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + pairs))
                                  : _mm256_maskz_loadu_epi16(t.m16, x + pairs);
    const __m512 a = widen(a_bits), b = widen(b_bits);
    const __m512 out_a = _mm512_fmsub_ps(a, t.c0, _mm512_mul_ps(b, t.s0));
    const __m512 out_b = _mm512_fmadd_ps(b, t.c0, _mm512_mul_ps(a, t.s0));
    const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(out_b, out_a));  // [out_a | out_b]
    if (t.full) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_castsi512_si256(both));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + pairs), _mm512_extracti64x4_epi64(both, 1));
    } else {
      _mm256_mask_storeu_epi16(out, t.m16, _mm512_castsi512_si256(both));
      _mm256_mask_storeu_epi16(out + pairs, t.m16, _mm512_extracti64x4_epi64(both, 1));
    }
  } else {  // pairs (2j, 2j + 1): 32 consecutive channels
    const __m512i bits = t.full ? _mm512_loadu_si512(x) : _mm512_maskz_loadu_epi16(t.m32, x);
    const __m512 lo = widen(_mm512_castsi512_si256(bits)), hi = widen(_mm512_extracti64x4_epi64(bits, 1));
    const __m512 out_lo = _mm512_fmadd_ps(lo, t.c0, _mm512_mul_ps(_mm512_permute_ps(lo, 0xB1), t.s0));
    const __m512 out_hi = _mm512_fmadd_ps(hi, t.c1, _mm512_mul_ps(_mm512_permute_ps(hi, 0xB1), t.s1));
    const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(out_hi, out_lo));
    if (t.full)
      _mm512_storeu_si512(out, both);
    else
      _mm512_mask_storeu_epi16(out, t.m32, both);
  }
}

// `members` rows that share one table row (Members > 0: known at compile time). With Pairs known (at
// most 64) the whole table row is arranged in registers once, then each row is rotated from start to
// end (rows of a group lie far apart, and alternating between them chunk by chunk stalls on 4K
// aliasing); otherwise each row loads the table chunks again (from L1).
template <bool Interleaved, int Members, int64_t Pairs>
inline void rotate_rows_bf16(const bf16* const* x, bf16* const* out, int members, const float* __restrict__ cos,
                             const float* __restrict__ sin, int64_t pairs, float sign) {
  const __m512 sign_v = _mm512_set1_ps(sign);
  constexpr int64_t width = Interleaved ? 2 : 1;  // channels per pair in one run
  if constexpr (Pairs > 0 && Pairs <= 64) {
    constexpr int64_t chunks = (Pairs + 15) / 16;
    Bf16Chunk t[chunks];
    for (int64_t k = 0; k < chunks; ++k) t[k] = bf16_chunk<Interleaved>(cos + 16 * k, sin + 16 * k, sign_v, Pairs - 16 * k);
    for (int m = 0; m < (Members ? Members : members); ++m)
      for (int64_t k = 0; k < chunks; ++k) bf16_apply<Interleaved>(t[k], x[m] + width * 16 * k, out[m] + width * 16 * k, Pairs);
  } else {
    for (int m = 0; m < (Members ? Members : members); ++m)
      for (int64_t j = 0; j < pairs; j += 16)
        bf16_apply<Interleaved>(bf16_chunk<Interleaved>(cos + j, sin + j, sign_v, pairs - j), x[m] + width * j,
                                out[m] + width * j, pairs);
  }
}

template <bool Interleaved>
inline void rotate_row_bf16(const bf16* __restrict__ x, const float* __restrict__ cos,
                            const float* __restrict__ sin, bf16* __restrict__ out, int64_t pairs, float sign) {
  const bf16* rows[1] = {x};
  bf16* outs[1] = {out};
  rotate_rows_bf16<Interleaved, 1, 0>(rows, outs, 1, cos, sin, pairs, sign);
}
#endif  // NDROPE_NATIVE_BF16

// One row: the first 2P channels rotated by sign * angle, the rest copied.
template <typename T, typename C, bool Interleaved>
inline void rotate_row(const T* __restrict__ x, const C* __restrict__ cos, const C* __restrict__ sin,
                       T* __restrict__ out, int64_t pairs, int64_t dim, C sign) {
#ifdef NDROPE_NATIVE_BF16
  if constexpr (std::is_same_v<T, bf16> && std::is_same_v<C, float>) {
    rotate_row_bf16<Interleaved>(x, cos, sin, out, pairs, sign);
    for (int64_t j = 2 * pairs; j < dim; ++j) out[j] = x[j];
    return;
  }
#endif
#pragma omp simd
  for (int64_t j = 0; j < pairs; ++j) {
    const int64_t a = first<Interleaved>(j, pairs), b = second<Interleaved>(j, pairs);
    const C xa = load<C>(x[a]), xb = load<C>(x[b]);
    const C c = cos[j], s = sign * sin[j];
    out[a] = store<T, C>(xa * c - xb * s);
    out[b] = store<T, C>(xb * c + xa * s);
  }
  for (int64_t j = 2 * pairs; j < dim; ++j) out[j] = x[j];
}

// Non-temporal stores: a row is computed into an L1 buffer, then written past the caches. Worth it
// only for outputs that, with their input, do not fit the last-level cache (they would be evicted
// before anyone reads them): the write then costs one memory transfer instead of two (no read for
// ownership), as glibc's memcpy does for large copies. x86 only; rows of whole 64-byte lines.
#if defined(__SSE2__)
constexpr bool kCanStream = true;
inline void stream_row(void* dst, const void* src, int64_t bytes) {  // 64-byte aligned, bytes % 64 == 0
  auto* to = static_cast<unsigned char*>(dst);
  const auto* from = static_cast<const unsigned char*>(src);
  for (int64_t b = 0; b < bytes; b += 64) {
#if defined(__AVX512F__)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(to + b), _mm512_load_si512(from + b));
#elif defined(__AVX__)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(to + b), _mm256_load_si256(reinterpret_cast<const __m256i*>(from + b)));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(to + b + 32),
                        _mm256_load_si256(reinterpret_cast<const __m256i*>(from + b + 32)));
#else
    for (int k = 0; k < 64; k += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(to + b + k), _mm_load_si128(reinterpret_cast<const __m128i*>(from + b + k)));
#endif
  }
}
inline void stream_fence() { _mm_sfence(); }  // the streamed rows are visible before the call returns
#else
constexpr bool kCanStream = false;
inline void stream_row(void*, const void*, int64_t) {}
inline void stream_fence() {}
#endif
constexpr int64_t kStreamRowBytes = 4096;  // the L1 buffer of one row

// Up to kGroup rows that share their cos/sin (rows along the dims the tables broadcast over, such as
// batch and heads) go through each table row together: the table row is read from memory once and
// from L1 for the others. The table is as large as x per row in bfloat16, so reading it once per x
// row, from L2 or L3, would cost about as much traffic as x itself.
constexpr int kGroup = 4;

// A run of table rows, each applied to `members` x rows; row i of the run is at pointer + i * step[o].
template <typename T, typename C>
struct Run {
  const T* x[kGroup];
  T* out[kGroup];
  int members;
  const C* cos;
  const C* sin;
  const int64_t* step;
  int64_t rows, pairs, dim;
  C sign;
  bool stream;  // write rows with non-temporal stores (where aligned)
};

// Members and Pairs known at compile time (0: read them from the run) let the loops unroll.
template <typename T, typename C, bool Interleaved, int64_t Pairs, int Members>
void rotate_run_fixed(const Run<T, C>& r) {
  const int members = Members ? Members : r.members;
  const int64_t bytes = r.dim * int64_t(sizeof(T));  // of one row
  for (int64_t i = 0; i < r.rows; ++i) {
    const C* cos = r.cos + i * r.step[1];
    const C* sin = r.sin + i * r.step[2];
#ifdef NDROPE_NATIVE_BF16
    if constexpr (std::is_same_v<T, bf16> && std::is_same_v<C, float>) {
      if (!r.stream) {  // the table chunk is loaded once for all members
        const T* x[kGroup];
        T* out[kGroup];
        for (int m = 0; m < members; ++m) {
          x[m] = r.x[m] + i * r.step[0];
          out[m] = r.out[m] + i * r.step[3];
        }
        rotate_rows_bf16<Interleaved, Members, Pairs>(x, out, members, cos, sin, Pairs ? Pairs : r.pairs, r.sign);
        for (int m = 0; m < members; ++m)
          for (int64_t j = 2 * (Pairs ? Pairs : r.pairs); j < r.dim; ++j) out[m][j] = x[m][j];
        continue;
      }
    }
#endif
    for (int m = 0; m < members; ++m) {
      T* out = r.out[m] + i * r.step[3];
      if (r.stream && bytes <= kStreamRowBytes && bytes % 64 == 0 && reinterpret_cast<uintptr_t>(out) % 64 == 0) {
        alignas(64) unsigned char row[kStreamRowBytes];
        rotate_row<T, C, Interleaved>(r.x[m] + i * r.step[0], cos, sin, reinterpret_cast<T*>(row),
                                      Pairs ? Pairs : r.pairs, r.dim, r.sign);
        stream_row(out, row, bytes);
      } else {
        rotate_row<T, C, Interleaved>(r.x[m] + i * r.step[0], cos, sin, out, Pairs ? Pairs : r.pairs, r.dim, r.sign);
      }
    }
  }
}

template <typename T, typename C, bool Interleaved, int64_t Pairs>
void rotate_run_pairs(const Run<T, C>& r) {
  r.members == kGroup ? rotate_run_fixed<T, C, Interleaved, Pairs, kGroup>(r)
                      : rotate_run_fixed<T, C, Interleaved, Pairs, 0>(r);
}

template <typename T, typename C, bool Interleaved>
void rotate_run(const Run<T, C>& r) {
  // unrolled for head dims 32, 64 and 128 rotated whole, in the dtypes models run in (float32 and
  // bfloat16 x, float32 tables); the other combinations keep one loop, which keeps the build short
  if constexpr (std::is_same_v<C, float> && (std::is_same_v<T, float> || std::is_same_v<T, bf16>)) {
    switch (r.pairs) {
      case 16: return rotate_run_pairs<T, C, Interleaved, 16>(r);
      case 32: return rotate_run_pairs<T, C, Interleaved, 32>(r);
      case 64: return rotate_run_pairs<T, C, Interleaved, 64>(r);
      default: break;
    }
  }
  rotate_run_pairs<T, C, Interleaved, 0>(r);
}

// Backward of one row when the angles are learned: grad_x (rotation by -sign * angle, if wanted)
// and the row's contribution to d cos, d sin, accumulated into the table row's sums.
template <typename T, typename C, bool Interleaved>
inline void backward_row(const T* __restrict__ g, const T* __restrict__ x, const C* __restrict__ cos,
                         const C* __restrict__ sin, T* __restrict__ dx, C* __restrict__ dcos,
                         C* __restrict__ dsin, int64_t pairs, int64_t dim, C sign) {
#pragma omp simd
  for (int64_t j = 0; j < pairs; ++j) {
    const int64_t a = first<Interleaved>(j, pairs), b = second<Interleaved>(j, pairs);
    const C ga = load<C>(g[a]), gb = load<C>(g[b]), xa = load<C>(x[a]), xb = load<C>(x[b]);
    const C c = cos[j], s = sign * sin[j];
    if (dx) {
      dx[a] = store<T, C>(ga * c + gb * s);
      dx[b] = store<T, C>(gb * c - ga * s);
    }
    dcos[j] += ga * xa + gb * xb;
    dsin[j] += sign * (gb * xa - ga * xb);
  }
  if (dx)
    for (int64_t j = 2 * pairs; j < dim; ++j) dx[j] = g[j];
}
// ---- the ABI shared with ndrope/_kernel.py -------------------------------------------------------

constexpr int32_t kAbiVersion = 3;
constexpr int kMaxOperands = 7;

struct Operand {
  void* data;              // first element
  const int64_t* strides;  // element strides over the ndim row dims (x.shape[:-1]); 0 = broadcast
};

struct RotaryCall {
  int32_t abi_version;  // kAbiVersion
  int32_t x_dtype;      // 0 float32, 1 float64, 2 bfloat16, 3 float16
  int32_t table_dtype;  // cos/sin: 0 float32, 1 float64 (at least as wide as x: the compute dtype)
  int32_t interleaved;  // 0 half, 1 interleaved
  int32_t inverse;      // 1: rotate by -angle (the backward)
  int32_t threads;      // OpenMP threads (torch.get_num_threads())
  int64_t ndim;         // row dims, <= kMaxDims
  int64_t pairs;        // P rotated pairs, 2P <= dim
  int64_t dim;          // D channels per row (unit stride)
  const int64_t* sizes; // the ndim row sizes
  int64_t n_operands;   // 4 for forward (x, cos, sin, out), 7 for backward (grad, x, cos, sin, dx, dcos, dsin)
  int64_t stream_bytes; // forward: non-temporal stores when x + out exceed this (the last-level cache); 0 never
  Operand operands[kMaxOperands];
};

enum Status : int32_t { kOk = 0, kBadXDtype = 1, kBadTableDtype = 2, kTooManyDims = 3, kBadAbi = 4,
                        kBadOperands = 5, kBadShape = 6 };

struct Call {
  int64_t ndim, pairs, dim;
  bool interleaved, inverse;
  int threads;
  const RotaryCall* raw;
  const int64_t* sizes;
  template <typename P> P* data(int op) const { return static_cast<P*>(raw->operands[op].data); }
  const int64_t* strides(int op) const { return raw->operands[op].strides; }
};

// optional: the index of the one operand that may be null (the backward's dx), or -1
int32_t check(const RotaryCall* call, int64_t ops, int64_t optional) {
  if (call == nullptr || call->abi_version != kAbiVersion) return kBadAbi;
  if (call->n_operands != ops) return kBadOperands;
  if (call->ndim < 0 || call->ndim > kMaxDims) return kTooManyDims;
  if (call->pairs < 0 || call->dim < 2 * call->pairs || (call->ndim > 0 && call->sizes == nullptr)) return kBadShape;
  for (int64_t o = 0; o < ops; ++o) {
    if (call->operands[o].data == nullptr && o != optional) return kBadOperands;
    if (call->ndim > 0 && call->operands[o].data != nullptr && call->operands[o].strides == nullptr) return kBadOperands;
  }
  return kOk;
}

// x's row dims in two index spaces: the dims the tables (operands a and b) vary over, and the dims
// they broadcast over (stride 0 in both), such as batch and heads.
template <int Ops>
struct TableRows {
  Rows<Ops> tables, shared;
};

template <int Ops>
TableRows<Ops> table_rows(const Call& call, int a, int b) {
  const int64_t* strides[Ops];
  for (int o = 0; o < Ops; ++o) strides[o] = call.strides(o);
  bool table_dim[kMaxDims], shared_dim[kMaxDims];
  for (int64_t d = 0; d < call.ndim; ++d) {
    shared_dim[d] = strides[a][d] == 0 && strides[b][d] == 0;
    table_dim[d] = !shared_dim[d];
  }
  return {Rows<Ops>(call.ndim, call.sizes, strides, table_dim), Rows<Ops>(call.ndim, call.sizes, strides, shared_dim)};
}

// Forward (and backward with fixed angles): operands x, cos, sin, out.
// Work items are (group of kGroup broadcast rows, table row), group-major, split evenly over threads.
template <typename T, typename C>
void rotate(const Call& call) {
  const TableRows<4> split = table_rows<4>(call, 1, 2);
  const Rows<4>& tables = split.tables;
  const Rows<4>& shared = split.shared;
  const T* x = call.data<const T>(0);
  const C* cos = call.data<const C>(1);
  const C* sin = call.data<const C>(2);
  T* out = call.data<T>(3);
  const C sign = call.inverse ? C(-1) : C(1);
  const int64_t step[4] = {tables.step(0), tables.step(1), tables.step(2), tables.step(3)};
  const int64_t groups = (shared.count + kGroup - 1) / kGroup, rows = tables.count;
  const int64_t out_bytes = tables.count * shared.count * call.dim * int64_t(sizeof(T));
  const bool stream = kCanStream && call.raw->stream_bytes > 0 && 2 * out_bytes > call.raw->stream_bytes;
  parallel_rows(groups * rows, tables.count * shared.count * call.dim, call.threads, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end;) {
      const int64_t group = item / rows, first = item % rows;
      const int64_t last = end - item < rows - first ? first + (end - item) : rows;
      Run<T, C> run{};
      run.members = static_cast<int>(shared.count - group * kGroup < kGroup ? shared.count - group * kGroup : kGroup);
      int64_t member[kGroup][4];
      for (int m = 0; m < run.members; ++m) shared.offsets(group * kGroup + m, member[m]);
      run.step = step;
      run.pairs = call.pairs;
      run.dim = call.dim;
      run.sign = sign;
      run.stream = stream;
      tables.walk(first, last, [&](const int64_t* off, int64_t count) {
        for (int m = 0; m < run.members; ++m) {
          run.x[m] = x + off[0] + member[m][0];
          run.out[m] = out + off[3] + member[m][3];
        }
        run.cos = cos + off[1];  // the shared dims are the ones cos/sin broadcast over (stride 0)
        run.sin = sin + off[2];
        run.rows = count;
        call.interleaved ? rotate_run<T, C, true>(run) : rotate_run<T, C, false>(run);
      });
      item += last - first;
    }
    if (stream) stream_fence();
  });
}

// Backward with learned angles: operands grad, x, cos, sin, dx (null: not wanted), dcos, dsin.
// dcos/dsin are the (unexpanded) tables, stride 0 on the dims they broadcast over. Threads own
// table rows and sum over the broadcast dims themselves, so no two threads write the same row.
template <typename T, typename C>
void rotate_backward(const Call& call) {
  const TableRows<7> split = table_rows<7>(call, 5, 6);  // by the gradient tables, which own the sums
  const Rows<7>& outer = split.tables;
  const Rows<7>& inner = split.shared;
  const T* g = call.data<const T>(0);
  const T* x = call.data<const T>(1);
  const C* cos = call.data<const C>(2);
  const C* sin = call.data<const C>(3);
  T* dx = call.data<T>(4);
  C* dcos = call.data<C>(5);
  C* dsin = call.data<C>(6);
  const C sign = call.inverse ? C(-1) : C(1);
  const int64_t pairs = call.pairs, dim = call.dim;
  parallel_rows(outer.count, outer.count * inner.count * dim, call.threads, [&](int64_t begin, int64_t end) {
    outer.walk(begin, end, [&](const int64_t* outer_start, int64_t outer_run) {
      for (int64_t k = 0; k < outer_run; ++k) {
        int64_t o[7];
        for (int q = 0; q < 7; ++q) o[q] = outer_start[q] + k * outer.step(q);
        C* dc = dcos + o[5];
        C* ds = dsin + o[6];
        for (int64_t j = 0; j < pairs; ++j) dc[j] = ds[j] = C(0);
        inner.walk(0, inner.count, [&](const int64_t* inner_start, int64_t inner_run) {
          for (int64_t m = 0; m < inner_run; ++m) {
            int64_t i[7];
            for (int q = 0; q < 7; ++q) i[q] = inner_start[q] + m * inner.step(q);
            const T* g_row = g + o[0] + i[0];
            const T* x_row = x + o[1] + i[1];
            T* dx_row = dx ? dx + o[4] + i[4] : nullptr;
            if (call.interleaved)
              backward_row<T, C, true>(g_row, x_row, cos + o[2], sin + o[3], dx_row, dc, ds, pairs, dim, sign);
            else
              backward_row<T, C, false>(g_row, x_row, cos + o[2], sin + o[3], dx_row, dc, ds, pairs, dim, sign);
          }
        });
      }
    });
  });
}

template <template <typename, typename> class Kernel>
int32_t dispatch(const RotaryCall* raw, int64_t ops, int64_t optional) {
  const int32_t status = check(raw, ops, optional);
  if (status != kOk) return status;
  const Call call{raw->ndim, raw->pairs, raw->dim, raw->interleaved != 0, raw->inverse != 0,
                  raw->threads > 0 ? raw->threads : 1, raw, raw->sizes};
  if (raw->table_dtype != 0 && raw->table_dtype != 1) return kBadTableDtype;
  const bool wide = raw->table_dtype == 1;
  switch (raw->x_dtype) {
    case 0: wide ? Kernel<float, double>::run(call) : Kernel<float, float>::run(call); return kOk;
    case 1: if (!wide) return kBadTableDtype; Kernel<double, double>::run(call); return kOk;
    case 2: wide ? Kernel<bf16, double>::run(call) : Kernel<bf16, float>::run(call); return kOk;
    case 3: wide ? Kernel<_Float16, double>::run(call) : Kernel<_Float16, float>::run(call); return kOk;
    default: return kBadXDtype;
  }
}

template <typename T, typename C> struct Forward {
  static void run(const Call& call) { rotate<T, C>(call); }
};
template <typename T, typename C> struct Backward {
  static void run(const Call& call) { rotate_backward<T, C>(call); }
};

}  // namespace

// The layout Python must mirror: writes {version, sizeof(RotaryCall), sizeof(Operand), offsets of the
// fields in declaration order} into out (capacity n); returns how many values it wrote.
extern "C" int64_t ndrope_abi(int64_t* out, int64_t n) {
  const int64_t values[] = {
      kAbiVersion, sizeof(RotaryCall), sizeof(Operand),
      offsetof(RotaryCall, abi_version), offsetof(RotaryCall, x_dtype), offsetof(RotaryCall, table_dtype),
      offsetof(RotaryCall, interleaved), offsetof(RotaryCall, inverse), offsetof(RotaryCall, threads),
      offsetof(RotaryCall, ndim), offsetof(RotaryCall, pairs), offsetof(RotaryCall, dim),
      offsetof(RotaryCall, sizes), offsetof(RotaryCall, n_operands), offsetof(RotaryCall, stream_bytes),
      offsetof(RotaryCall, operands),
      offsetof(Operand, data), offsetof(Operand, strides)};
  const int64_t count = sizeof(values) / sizeof(values[0]);
  for (int64_t i = 0; i < count && i < n; ++i) out[i] = values[i];
  return count;
}

// Both return a Status: 0 on success, nothing written otherwise.
extern "C" int32_t ndrope_rotate(const RotaryCall* call) { return dispatch<Forward>(call, 4, -1); }
extern "C" int32_t ndrope_rotate_backward(const RotaryCall* call) { return dispatch<Backward>(call, 7, 4); }
