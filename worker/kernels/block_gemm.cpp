// Linear layers straight from GGUF weight blocks (Q8_0, Q4_0, Q4_1), never widened to float in memory.
//
// The same source is compiled once per instruction set (kernels/blocks.py passes the flags: none for the portable
// build, -mavx2 -mfma -mf16c, or those plus AVX-512 VNNI) and Python loads only the builds its CPU can run, so no
// build ever executes an instruction its machine lacks.
//
// A block holds 32 consecutive inputs of one output row (ggml's encodings):
//   Q8_0: fp16 d, int8 q[32]                 w = d * q
//   Q4_0: fp16 d, uint8 nibbles[16]          w = d * (q - 8)
//   Q4_1: fp16 d, fp16 m, uint8 nibbles[16]  w = d * q + m
// where nibble byte j holds element j in its low half and element j + 16 in its high half. The kernels read the
// "x8" layout (blocks.repack): rows in groups of eight, the file's bytes of a group regrouped so that one 32-byte
// load holds the same four quant bytes of all eight rows. A group is every block's quants (block b: for each step
// of four quant bytes, rows 0..7 four bytes each), then every block's eight d, then (Q4_1) every block's eight m.
// A vector lane is then a row: products need no horizontal sums, and a block's eight scales load at once.
//
// linear(x, blocks) rounds each 32 inputs of every activation row to int8 with one float scale dx (as llama.cpp
// does), so products are integer dot products: output = sum over blocks, in order, of fma(sum(q * qx), d * dx)
// then fma(c, sx), where c is the block's constant term (m, or -8 d) and sx = dx * sum(qx). Every build computes
// exactly that sequence for each (row, token), so all builds, batch sizes and tiles give the same bits.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define RS_AVX2 1
#include <immintrin.h>
#endif
#if defined(RS_AVX2) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define RS_VNNI 1
#endif

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kRows = 8;       // rows interleaved in a group: one per 32-bit lane of a 256-bit vector
constexpr int64_t kTokenTile = 4;  // tokens a group's decoded quants serve at once
enum BlockType : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8 };  // ggml's type ids

constexpr int64_t quant_bytes(int64_t type) { return type == kQ8_0 ? 32 : 16; }
constexpr int64_t block_bytes(int64_t type) { return type == kQ8_0 ? 34 : type == kQ4_0 ? 18 : 20; }

void check_type(int64_t type) {
  TORCH_CHECK(type == kQ8_0 || type == kQ4_0 || type == kQ4_1, "block type: ", type,
              " is not one of Q4_0 (2), Q4_1 (3), Q8_0 (8)");
}

inline float fp16(uint16_t bits) {
#if defined(RS_AVX2)
  return _cvtsh_ss(bits);
#else
  return c10::detail::fp16_ieee_to_fp32_value(bits);
#endif
}

// One group of eight rows in the x8 layout.
template <int64_t Type>
struct Group {
  const uint8_t* q;
  const uint16_t* d;
  const uint16_t* m;  // Q4_1 only

  Group(const uint8_t* group, int64_t blocks)
      : q(group), d(reinterpret_cast<const uint16_t*>(group + blocks * kRows * quant_bytes(Type))),
        m(d + blocks * kRows) {}

  const uint8_t* block(int64_t b) const { return q + b * kRows * quant_bytes(Type); }

  // Quant byte j (ggml's order within the block) of row r.
  uint8_t byte(int64_t b, int64_t r, int64_t j) const { return block(b)[(j / 4) * 32 + r * 4 + j % 4]; }

  // The constant term c of row r's block b (w = d * q + c).
  float constant(int64_t b, int64_t r) const {
    if constexpr (Type == kQ8_0) return 0.f;
    if constexpr (Type == kQ4_0) return -8.f * fp16(d[b * kRows + r]);
    return fp16(m[b * kRows + r]);
  }
};

// Activation rows rounded per block: q [T, K] int8, d [T, K/32] scales, s [T, K/32] = d * sum(q).
struct Activations {
  at::Tensor q_tensor, d_tensor, s_tensor;
  const int8_t* q;
  const float* d;
  const float* s;
  int64_t k, blocks;
};

void quantize_row(const float* x, int64_t blocks, int8_t* q, float* d, float* s) {
  for (int64_t b = 0; b < blocks; ++b) {
    const float* xb = x + b * kBlock;
    float amax = 0.f;
    for (int64_t j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float scale = amax / 127.f;
    const float inverse = scale > 0.f ? 1.f / scale : 0.f;
    int32_t sum = 0;
    for (int64_t j = 0; j < kBlock; ++j) {
      const int32_t v = static_cast<int32_t>(std::nearbyint(xb[j] * inverse));
      q[b * kBlock + j] = static_cast<int8_t>(v);
      sum += v;
    }
    d[b] = scale;
    s[b] = scale * static_cast<float>(sum);
  }
}

Activations quantize_activations(const at::Tensor& x) {
  const int64_t tokens = x.size(0), k = x.size(1), blocks = k / kBlock;
  at::Tensor q = at::empty({tokens, k}, x.options().dtype(at::kChar));
  at::Tensor d = at::empty({tokens, blocks}, x.options()), s = at::empty({tokens, blocks}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* dp = d.data_ptr<float>();
  float* sp = s.data_ptr<float>();
  at::parallel_for(0, tokens, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) quantize_row(xp + t * k, blocks, qp + t * k, dp + t * blocks, sp + t * blocks);
  });
  return {q, d, s, qp, dp, sp, k, blocks};
}

#if defined(RS_AVX2)
constexpr int64_t kPrefetch = 2048;  // bytes ahead of the quants being read

inline __m256i broadcast4(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm256_set1_epi32(v);
}

// Eight int32 sums (one per row) of block b's products with NT tokens.
template <int64_t Type, int NT>
inline void block_products(const Group<Type>& group, const Activations& a, int64_t b, __m256i (&sums)[NT]) {
  const uint8_t* q = group.block(b);
#if !defined(RS_VNNI)
  const __m256i ones = _mm256_set1_epi16(1);
#endif
  if constexpr (Type == kQ8_0) {
    for (int step = 0; step < 8; ++step) {  // inputs 4 step .. 4 step + 3 of each row
      if (step % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(q + step * 32 + kPrefetch), _MM_HINT_T0);
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + step * 32));
      const __m256i magnitude = _mm256_sign_epi8(w, w);  // |q| as the unsigned operand, q's sign moved onto x
      for (int t = 0; t < NT; ++t) {
        const __m256i x = _mm256_sign_epi8(broadcast4(a.q + t * a.k + b * kBlock + 4 * step), w);
#if defined(RS_VNNI)
        sums[t] = _mm256_dpbusd_epi32(step ? sums[t] : _mm256_setzero_si256(), magnitude, x);
#else
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, x), ones);
        sums[t] = step ? _mm256_add_epi32(sums[t], p) : p;
#endif
      }
    }
  } else {
    const __m256i nibble = _mm256_set1_epi8(0x0F);
#if !defined(RS_VNNI)
    __m256i pairs[NT];  // int16 pair sums: 8 products of a nibble and an int8 stay within +-30480
#endif
    for (int step = 0; step < 4; ++step) {  // inputs 4 step .. 4 step + 3 (low nibbles) and 16 more (high)
      if (step % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(q + step * 32 + kPrefetch), _MM_HINT_T0);
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + step * 32));
      const __m256i low = _mm256_and_si256(packed, nibble);
      const __m256i high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);
      for (int t = 0; t < NT; ++t) {
        const int8_t* x = a.q + t * a.k + b * kBlock + 4 * step;
#if defined(RS_VNNI)
        sums[t] = _mm256_dpbusd_epi32(step ? sums[t] : _mm256_setzero_si256(), low, broadcast4(x));
        sums[t] = _mm256_dpbusd_epi32(sums[t], high, broadcast4(x + 16));
#else
        const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(low, broadcast4(x)),
                                           _mm256_maddubs_epi16(high, broadcast4(x + 16)));
        pairs[t] = step ? _mm256_add_epi16(pairs[t], p) : p;
#endif
      }
    }
#if !defined(RS_VNNI)
    for (int t = 0; t < NT; ++t) sums[t] = _mm256_madd_epi16(pairs[t], ones);
#endif
  }
}

// out[t * stride + r] = row r of the group . token t, for NT tokens and the group's first `rows` rows.
template <int64_t Type, int NT>
void group_dot(const Group<Type>& group, const Activations& a, int64_t t0, int64_t rows, float* out,
               int64_t stride) {
  const Activations part{a.q_tensor, a.d_tensor, a.s_tensor, a.q + t0 * a.k, a.d + t0 * a.blocks,
                         a.s + t0 * a.blocks, a.k, a.blocks};
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < a.blocks; ++b) {
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(group.d + b * kRows)));
    __m256 c = _mm256_setzero_ps();
    if constexpr (Type == kQ4_1) c = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(group.m + b * kRows)));
    if constexpr (Type == kQ4_0) c = _mm256_mul_ps(d, _mm256_set1_ps(-8.f));
    __m256i sums[NT];
    block_products<Type, NT>(group, part, b, sums);
    for (int t = 0; t < NT; ++t) {
      const float* scales = part.d + t * a.blocks + b;
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[t]), _mm256_mul_ps(d, _mm256_set1_ps(*scales)), acc[t]);
      if constexpr (Type != kQ8_0) acc[t] = _mm256_fmadd_ps(c, _mm256_set1_ps(part.s[t * a.blocks + b]), acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    float* o = out + (t0 + t) * stride;
    if (rows == kRows) {
      _mm256_storeu_ps(o, acc[t]);
    } else {
      float lanes[kRows];
      _mm256_storeu_ps(lanes, acc[t]);
      std::copy(lanes, lanes + rows, o);
    }
  }
}
#else
template <int64_t Type>
inline int32_t weight(const Group<Type>& group, int64_t b, int64_t r, int64_t j) {
  if constexpr (Type == kQ8_0) return static_cast<int8_t>(group.byte(b, r, j));
  return j < 16 ? (group.byte(b, r, j) & 0x0F) : (group.byte(b, r, j - 16) >> 4);
}

template <int64_t Type, int NT>
void group_dot(const Group<Type>& group, const Activations& a, int64_t t0, int64_t rows, float* out,
               int64_t stride) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int t = 0; t < NT; ++t) {
      const int64_t token = t0 + t;
      float acc = 0.f;
      for (int64_t b = 0; b < a.blocks; ++b) {
        const int8_t* x = a.q + token * a.k + b * kBlock;
        int32_t sum = 0;
        for (int64_t j = 0; j < kBlock; ++j) sum += weight<Type>(group, b, r, j) * x[j];
        const float scale = fp16(group.d[b * kRows + r]) * a.d[token * a.blocks + b];
        acc = std::fma(static_cast<float>(sum), scale, acc);
        if constexpr (Type != kQ8_0) acc = std::fma(group.constant(b, r), a.s[token * a.blocks + b], acc);
      }
      out[token * stride + r] = acc;
    }
  }
}
#endif

// Groups [g0, g1) for every token, kTokenTile tokens at a time (a group's quants decoded once a tile).
template <int64_t Type>
void linear_groups(const uint8_t* blocks, int64_t group_bytes, const Activations& a, int64_t tokens, int64_t g0,
                   int64_t g1, int64_t out_features, float* out) {
  for (int64_t g = g0; g < g1; ++g) {
    const Group<Type> group(blocks + g * group_bytes, a.blocks);
    const int64_t rows = std::min(kRows, out_features - g * kRows);
    float* o = out + g * kRows;
    int64_t t = 0;
    for (; t + kTokenTile <= tokens; t += kTokenTile) group_dot<Type, kTokenTile>(group, a, t, rows, o, out_features);
    switch (tokens - t) {
      case 3: group_dot<Type, 3>(group, a, t, rows, o, out_features); break;
      case 2: group_dot<Type, 2>(group, a, t, rows, o, out_features); break;
      case 1: group_dot<Type, 1>(group, a, t, rows, o, out_features); break;
    }
  }
}

int64_t groups_for(int64_t rows) { return (rows + kRows - 1) / kRows; }

void check_blocks(const at::Tensor& blocks, int64_t type, int64_t in_features) {
  check_type(type);
  TORCH_CHECK(blocks.device().is_cpu() && blocks.scalar_type() == at::kByte && blocks.dim() == 2 &&
                  blocks.is_contiguous(), "blocks: must be a contiguous CPU uint8 [groups, group_bytes] tensor");
  TORCH_CHECK(in_features % kBlock == 0, "in_features: ", in_features, " is not a multiple of ", kBlock);
  TORCH_CHECK(blocks.size(1) == kRows * (in_features / kBlock) * block_bytes(type), "blocks: ", blocks.size(1),
              " bytes a group do not hold ", kRows, " rows of ", in_features, " inputs of type ", type);
}

}  // namespace

namespace radixserve {

// x [T, K] float32 times the [N, K] weight the x8-layout blocks hold: [T, N] float32.
at::Tensor block_linear(const at::Tensor& x, const at::Tensor& blocks, int64_t type, int64_t out_features) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "x: must be a contiguous CPU float32 [tokens, in_features] tensor");
  const int64_t tokens = x.size(0), k = x.size(1);
  check_blocks(blocks, type, k);
  TORCH_CHECK(blocks.size(0) == groups_for(out_features), "out_features: ", out_features, " rows are not the ",
              blocks.size(0), " groups of ", kRows, " the blocks hold");
  at::Tensor out = at::empty({tokens, out_features}, x.options());
  if (tokens == 0 || out_features == 0) return out;
  const Activations a = quantize_activations(x);
  const uint8_t* bp = blocks.data_ptr<uint8_t>();
  const int64_t group_bytes = blocks.size(1);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, blocks.size(0), 4, [&](int64_t g0, int64_t g1) {
    switch (type) {
      case kQ8_0: linear_groups<kQ8_0>(bp, group_bytes, a, tokens, g0, g1, out_features, op); break;
      case kQ4_0: linear_groups<kQ4_0>(bp, group_bytes, a, tokens, g0, g1, out_features, op); break;
      case kQ4_1: linear_groups<kQ4_1>(bp, group_bytes, a, tokens, g0, g1, out_features, op); break;
    }
  });
  return out;
}

}  // namespace radixserve

namespace {

template <int64_t Type>
void dequantize_group(const uint8_t* bytes, int64_t blocks, float* out) {
  const Group<Type> group(bytes, blocks);
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float d = fp16(group.d[b * kRows + r]), c = group.constant(b, r);
      float* o = out + r * blocks * kBlock + b * kBlock;
      for (int64_t j = 0; j < quant_bytes(Type); ++j) {
        const uint8_t v = group.byte(b, r, j);
        if constexpr (Type == kQ8_0) {
          o[j] = d * static_cast<float>(static_cast<int8_t>(v));
        } else {
          o[j] = d * static_cast<float>(v & 0x0F) + c;
          o[j + 16] = d * static_cast<float>(v >> 4) + c;
        }
      }
    }
  }
}

}  // namespace

namespace radixserve {

// The float32 [groups * 8, K] weight the x8-layout blocks hold (a last group's padding rows are zeros).
at::Tensor block_dequantize(const at::Tensor& blocks, int64_t type, int64_t in_features) {
  check_blocks(blocks, type, in_features);
  const int64_t groups = blocks.size(0), nb = in_features / kBlock, group_bytes = blocks.size(1);
  at::Tensor out = at::empty({groups * kRows, in_features}, blocks.options().dtype(at::kFloat));
  const uint8_t* bp = blocks.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, groups, 8, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      float* o = op + g * kRows * in_features;
      switch (type) {
        case kQ8_0: dequantize_group<kQ8_0>(bp + g * group_bytes, nb, o); break;
        case kQ4_0: dequantize_group<kQ4_0>(bp + g * group_bytes, nb, o); break;
        case kQ4_1: dequantize_group<kQ4_1>(bp + g * group_bytes, nb, o); break;
      }
    }
  });
  return out;
}

const char* isa() {
#if defined(RS_VNNI)
  return "avx512vnni";
#elif defined(RS_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

}  // namespace radixserve
