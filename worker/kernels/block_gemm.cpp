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
// where nibble byte j holds element j in its low half and element j + 16 in its high half. The kernels read rows
// in the "split" layout (blocks.repack): the same bytes per row, regrouped as every block's quants, then every
// block's d, then (Q4_1) every block's m, so eight blocks' scales load in one instruction.
//
// linear(x, blocks) rounds each 32 inputs of every activation row to int8 with one float scale dx (as llama.cpp
// does), so products are integer dot products: output = sum over blocks of d * dx * sum(q * qx) + c * sx, where
// c is the block's constant term (m, or -8 d) and sx = dx * sum(qx). Work is split over output rows; a row's
// blocks are decoded eight at a time and serve four tokens at once.
#include <torch/extension.h>
#include <ATen/Parallel.h>
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
constexpr int64_t kGroup = 8;        // blocks whose sums are reduced together
constexpr int64_t kTokenTile = 4;   // tokens a row's decoded blocks serve at once
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

// One row in the split layout.
template <int64_t Type>
struct Row {
  const uint8_t* q;
  const uint16_t* d;
  const uint16_t* m;  // Q4_1 only

  Row(const uint8_t* row, int64_t blocks)
      : q(row), d(reinterpret_cast<const uint16_t*>(row + blocks * quant_bytes(Type))), m(d + blocks) {}

  // The block's constant term c (w = d * q + c).
  float constant(int64_t b) const {
    if constexpr (Type == kQ8_0) return 0.f;
    if constexpr (Type == kQ4_0) return -8.f * fp16(d[b]);
    return fp16(m[b]);
  }
};

// Activation rows rounded per block: q [T, K] int8, d [T, K/32] scales, s [T, K/32] = d * sum(q).
struct Activations {
  at::Tensor q_tensor, d_tensor, s_tensor;
  const int8_t* q;
  const float* d;
  const float* s;
  int64_t blocks;
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
  return {q, d, s, qp, dp, sp, blocks};
}

#if defined(RS_AVX2)
inline float hsum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_shuffle_ps(sum, sum, 1));
  return _mm_cvtss_f32(sum);
}

// Eight int32 partial sums of 32 unsigned-by-signed byte products.
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(RS_VNNI)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// Lane j of the result: the total of the eight lanes of s[j].
inline __m256i reduce8(const __m256i s[kGroup]) {
  const __m256i s0123 = _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3]));
  const __m256i s4567 = _mm256_hadd_epi32(_mm256_hadd_epi32(s[4], s[5]), _mm256_hadd_epi32(s[6], s[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(s0123, s4567, 0x20),
                          _mm256_permute2x128_si256(s0123, s4567, 0x31));
}

// Block quants as 32 unsigned bytes the products take (Q8_0: |q|; its sign goes onto x).
template <int64_t Type>
inline __m256i decode(const uint8_t* q) {
  if constexpr (Type == kQ8_0) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    return _mm256_sign_epi8(v, v);
  }
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

// Block b's products with token x (Q8_0's sign moved onto x): eight int32 partial sums.
template <int64_t Type>
inline __m256i block_sums(const Row<Type>& row, __m256i w, const int8_t* x, int64_t b) {
  __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  if constexpr (Type == kQ8_0)
    xv = _mm256_sign_epi8(xv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row.q + b * kBlock)));
  return dot_u8s8(w, xv);
}

// Blocks [g, g + 8) of the row times NT tokens: the eight blocks' sums reduced together, their eight scales
// loaded in one instruction.
template <int64_t Type, int NT>
inline void dot_group(const Row<Type>& row, const Activations& a, int64_t k, int64_t g, __m256 (&acc)[NT],
                      __m256 (&constant)[NT]) {
  __m256i w[kGroup];
  for (int64_t j = 0; j < kGroup; ++j) w[j] = decode<Type>(row.q + (g + j) * quant_bytes(Type));
  const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row.d + g)));
  const __m256 cw = Type == kQ4_1 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row.m + g)))
                                  : dw;  // Q4_0: -8 d, applied at the end
  for (int t = 0; t < NT; ++t) {
    const int8_t* x = a.q + t * k + g * kBlock;
    __m256i sums[kGroup];
    for (int64_t j = 0; j < kGroup; ++j) sums[j] = block_sums<Type>(row, w[j], x + j * kBlock, g + j);
    const __m256 dx = _mm256_loadu_ps(a.d + t * a.blocks + g);
    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(reduce8(sums)), _mm256_mul_ps(dw, dx), acc[t]);
    if constexpr (Type != kQ8_0) constant[t] = _mm256_fmadd_ps(cw, _mm256_loadu_ps(a.s + t * a.blocks + g), constant[t]);
  }
}

// The blocks after the last whole group, one at a time.
template <int64_t Type, int NT>
inline void dot_tail(const Row<Type>& row, const Activations& a, int64_t k, int64_t g, __m256 (&acc)[NT],
                     float (&constant)[NT]) {
  for (int64_t b = g; b < a.blocks; ++b) {
    const __m256i w = decode<Type>(row.q + b * quant_bytes(Type));
    const float d = fp16(row.d[b]), c = row.constant(b);
    for (int t = 0; t < NT; ++t) {
      const __m256 sums = _mm256_cvtepi32_ps(block_sums<Type>(row, w, a.q + t * k + b * kBlock, b));
      acc[t] = _mm256_fmadd_ps(sums, _mm256_set1_ps(d * a.d[t * a.blocks + b]), acc[t]);
      constant[t] += c * a.s[t * a.blocks + b];
    }
  }
}

// out[t] = row . x[t] for NT tokens (a fixed count, so the accumulators stay in registers).
template <int64_t Type, int NT>
void dot_row(const Row<Type>& row, const Activations& a, int64_t k, float* out) {
  __m256 acc[NT], constant[NT];
  float tail_constant[NT];
  for (int t = 0; t < NT; ++t) {
    acc[t] = constant[t] = _mm256_setzero_ps();
    tail_constant[t] = 0.f;
  }
  int64_t g = 0;
  for (; g + kGroup <= a.blocks; g += kGroup) dot_group<Type, NT>(row, a, k, g, acc, constant);
  dot_tail<Type, NT>(row, a, k, g, acc, tail_constant);
  for (int t = 0; t < NT; ++t) {
    const float grouped = Type == kQ8_0 ? 0.f : (Type == kQ4_0 ? -8.f : 1.f) * hsum(constant[t]);
    out[t] = hsum(acc[t]) + grouped + tail_constant[t];
  }
}
#else
template <int64_t Type>
inline int32_t weight(const uint8_t* q, int64_t j) {
  if constexpr (Type == kQ8_0) return static_cast<int8_t>(q[j]);
  return j < 16 ? (q[j] & 0x0F) : (q[j - 16] >> 4);
}

template <int64_t Type, int NT>
void dot_row(const Row<Type>& row, const Activations& a, int64_t k, float* out) {
  const int64_t tokens = NT;
  std::fill(out, out + tokens, 0.f);
  int32_t w[kBlock];
  for (int64_t b = 0; b < a.blocks; ++b) {
    const uint8_t* q = row.q + b * quant_bytes(Type);
    for (int64_t j = 0; j < kBlock; ++j) w[j] = weight<Type>(q, j);
    const float d = fp16(row.d[b]), c = row.constant(b);
    for (int64_t t = 0; t < tokens; ++t) {
      const int8_t* x = a.q + t * k + b * kBlock;
      int32_t sum = 0;
      for (int64_t j = 0; j < kBlock; ++j) sum += w[j] * x[j];
      out[t] += d * a.d[t * a.blocks + b] * static_cast<float>(sum) + c * a.s[t * a.blocks + b];
    }
  }
}
#endif

template <int64_t Type, int NT>
void tile(const uint8_t* blocks, int64_t row_bytes, const Activations& a, int64_t t0, int64_t k, int64_t n0,
          int64_t n1, int64_t out_features, float* out) {
  const Activations part{a.q_tensor, a.d_tensor, a.s_tensor, a.q + t0 * k, a.d + t0 * a.blocks,
                         a.s + t0 * a.blocks, a.blocks};
  float result[NT];
  for (int64_t n = n0; n < n1; ++n) {
    dot_row<Type, NT>(Row<Type>(blocks + n * row_bytes, a.blocks), part, k, result);
    for (int t = 0; t < NT; ++t) out[(t0 + t) * out_features + n] = result[t];
  }
}

// Rows [n0, n1) for every token, kTokenTile tokens at a time (each row's blocks decoded once a tile).
template <int64_t Type>
void linear_rows(const uint8_t* blocks, int64_t row_bytes, const Activations& a, int64_t tokens, int64_t k,
                 int64_t n0, int64_t n1, int64_t out_features, float* out) {
  int64_t t = 0;
  for (; t + kTokenTile <= tokens; t += kTokenTile)
    tile<Type, kTokenTile>(blocks, row_bytes, a, t, k, n0, n1, out_features, out);
  switch (tokens - t) {
    case 3: tile<Type, 3>(blocks, row_bytes, a, t, k, n0, n1, out_features, out); break;
    case 2: tile<Type, 2>(blocks, row_bytes, a, t, k, n0, n1, out_features, out); break;
    case 1: tile<Type, 1>(blocks, row_bytes, a, t, k, n0, n1, out_features, out); break;
  }
}

void check_blocks(const at::Tensor& blocks, int64_t type, int64_t in_features) {
  check_type(type);
  TORCH_CHECK(blocks.device().is_cpu() && blocks.scalar_type() == at::kByte && blocks.dim() == 2 &&
                  blocks.is_contiguous(), "blocks: must be a contiguous CPU uint8 [rows, row_bytes] tensor");
  TORCH_CHECK(in_features % kBlock == 0, "in_features: ", in_features, " is not a multiple of ", kBlock);
  TORCH_CHECK(blocks.size(1) == in_features / kBlock * block_bytes(type), "blocks: ", blocks.size(1),
              " bytes a row do not hold ", in_features, " inputs of type ", type);
}

// x [T, K] float32 times the [N, K] weight the split-layout blocks hold: [T, N] float32.
at::Tensor linear(const at::Tensor& x, const at::Tensor& blocks, int64_t type) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "x: must be a contiguous CPU float32 [tokens, in_features] tensor");
  const int64_t tokens = x.size(0), k = x.size(1), out_features = blocks.size(0);
  check_blocks(blocks, type, k);
  at::Tensor out = at::empty({tokens, out_features}, x.options());
  if (tokens == 0 || out_features == 0) return out;
  const Activations a = quantize_activations(x);
  const uint8_t* bp = blocks.data_ptr<uint8_t>();
  const int64_t row_bytes = blocks.size(1);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, out_features, 16, [&](int64_t n0, int64_t n1) {
    switch (type) {
      case kQ8_0: linear_rows<kQ8_0>(bp, row_bytes, a, tokens, k, n0, n1, out_features, op); break;
      case kQ4_0: linear_rows<kQ4_0>(bp, row_bytes, a, tokens, k, n0, n1, out_features, op); break;
      case kQ4_1: linear_rows<kQ4_1>(bp, row_bytes, a, tokens, k, n0, n1, out_features, op); break;
    }
  });
  return out;
}

template <int64_t Type>
void dequantize_row(const uint8_t* bytes, int64_t blocks, float* out) {
  const Row<Type> row(bytes, blocks);
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* q = row.q + b * quant_bytes(Type);
    const float d = fp16(row.d[b]), c = row.constant(b);
    float* o = out + b * kBlock;
    if constexpr (Type == kQ8_0) {
      for (int64_t j = 0; j < kBlock; ++j) o[j] = d * static_cast<float>(static_cast<int8_t>(q[j]));
    } else {
      for (int64_t j = 0; j < 16; ++j) {
        o[j] = d * static_cast<float>(q[j] & 0x0F) + c;
        o[j + 16] = d * static_cast<float>(q[j] >> 4) + c;
      }
    }
  }
}

// The float32 [rows, K] weight the split-layout blocks hold.
at::Tensor dequantize(const at::Tensor& blocks, int64_t type, int64_t in_features) {
  check_blocks(blocks, type, in_features);
  const int64_t rows = blocks.size(0), nb = in_features / kBlock, row_bytes = blocks.size(1);
  at::Tensor out = at::empty({rows, in_features}, blocks.options().dtype(at::kFloat));
  const uint8_t* bp = blocks.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      switch (type) {
        case kQ8_0: dequantize_row<kQ8_0>(bp + r * row_bytes, nb, op + r * in_features); break;
        case kQ4_0: dequantize_row<kQ4_0>(bp + r * row_bytes, nb, op + r * in_features); break;
        case kQ4_1: dequantize_row<kQ4_1>(bp + r * row_bytes, nb, op + r * in_features); break;
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "x [T, K] float32 times the weight held in split-layout blocks [N, row_bytes]: [T, N]");
  m.def("dequantize", &dequantize, "split-layout blocks [R, row_bytes] -> float32 [R, K]");
  m.def("isa", &isa, "the instruction set this build was compiled for");
}
