// Linear layers straight from GGUF weight blocks (Q8_0, Q4_0, Q4_1), never widened to float in memory.
//
// The same source is compiled once per instruction set (kernels/blocks.py passes the flags: none for the portable
// build, -mavx2 -mfma -mf16c, or those plus AVX-512 VNNI) and Python loads only the builds its CPU can run, so no
// build ever executes an instruction its machine lacks.
//
// A block holds 32 consecutive inputs of one output row (ggml's layouts):
//   Q8_0: fp16 d, int8 q[32]                 w = d * q
//   Q4_0: fp16 d, uint8 nibbles[16]          w = d * (q - 8)
//   Q4_1: fp16 d, fp16 m, uint8 nibbles[16]  w = d * q + m
// where byte j holds element j in its low nibble and element j + 16 in its high nibble.
//
// linear(x, blocks) quantizes each 32 inputs of every activation row to int8 with one float scale (as llama.cpp
// does, so products are integer dot products), then each output is the sum over blocks of
// d * dx * sum(q * qx) plus the block's constant term times sum(x). Work is split over output rows; each row's
// blocks are decoded once for up to four tokens.
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
constexpr int64_t kTokenTile = 4;
enum BlockType : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8 };  // ggml's type ids

int64_t block_bytes(int64_t type) {
  switch (type) {
    case kQ8_0: return 34;
    case kQ4_0: return 18;
    case kQ4_1: return 20;
  }
  TORCH_CHECK(false, "block type: ", type, " is not one of Q4_0 (2), Q4_1 (3), Q8_0 (8)");
}

inline float fp16(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof bits);
#if defined(RS_AVX2)
  return _cvtsh_ss(bits);
#else
  return c10::detail::fp16_ieee_to_fp32_value(bits);
#endif
}

// Activation rows quantized per block: q [T, K] int8, d [T, K/32] scales, s [T, K/32] = d * sum(q); the raw
// pointers are taken once, outside the per-row loops.
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
  const int64_t tokens = x.size(0), blocks = x.size(1) / kBlock;
  at::Tensor q = at::empty({tokens, x.size(1)}, x.options().dtype(at::kChar));
  at::Tensor d = at::empty({tokens, blocks}, x.options()), s = at::empty({tokens, blocks}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* dp = d.data_ptr<float>();
  float* sp = s.data_ptr<float>();
  at::parallel_for(0, tokens, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      quantize_row(xp + t * x.size(1), blocks, qp + t * x.size(1), dp + t * blocks, sp + t * blocks);
  });
  return {q, d, s, qp, dp, sp, blocks};
}

// Block b's integer weights (0..15 for Q4, -127..127 for Q8_0), its scale and its constant term's factor:
// w = d * q + c, so a block contributes d * dx * sum(q * qx) + c * s.
struct Block {
  const uint8_t* q;
  float d, c;
};

template <int64_t Type>
inline Block block_at(const uint8_t* row, int64_t b) {
  const uint8_t* p = row + b * (Type == kQ8_0 ? 34 : Type == kQ4_0 ? 18 : 20);
  const float d = fp16(p);
  if constexpr (Type == kQ8_0) return {p + 2, d, 0.f};
  if constexpr (Type == kQ4_0) return {p + 2, d, -8.f * d};
  return {p + 4, d, fp16(p + 2)};
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

template <int64_t Type>
inline __m256i load_weights(const uint8_t* q) {
  if constexpr (Type == kQ8_0) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), low_mask), _mm_and_si128(packed, low_mask));
}

// out[r * NT + i] = row r's dot product with token i, for NR consecutive rows and NT consecutive tokens: each
// weight block is decoded once for all NT tokens and each activation block loaded once for all NR rows.
template <int64_t Type, int NR, int NT>
void dot_tile(const uint8_t* rows, int64_t row_bytes, const Activations& a, const int8_t* qx, const float* dx,
              const float* sx, int64_t k, float* out) {
  __m256 acc[NR][NT];
  float constant[NR][NT];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < NT; ++i) {
      acc[r][i] = _mm256_setzero_ps();
      constant[r][i] = 0.f;
    }
  for (int64_t b = 0; b < a.blocks; ++b) {
    Block blk[NR];
    __m256i w[NR], sign[NR];
    for (int r = 0; r < NR; ++r) {
      blk[r] = block_at<Type>(rows + r * row_bytes, b);
      w[r] = sign[r] = load_weights<Type>(blk[r].q);
      if constexpr (Type == kQ8_0) w[r] = _mm256_sign_epi8(w[r], w[r]);  // |w|, its sign moved onto x below
    }
    for (int i = 0; i < NT; ++i) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + i * k + b * kBlock));
      const float xd = dx[i * a.blocks + b];
      for (int r = 0; r < NR; ++r) {
        const __m256i xs = Type == kQ8_0 ? _mm256_sign_epi8(x, sign[r]) : x;
        acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(w[r], xs)), _mm256_set1_ps(blk[r].d * xd), acc[r][i]);
        if constexpr (Type != kQ8_0) constant[r][i] += blk[r].c * sx[i * a.blocks + b];
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < NT; ++i) out[r * NT + i] = hsum(acc[r][i]) + constant[r][i];
}
#else
template <int64_t Type>
inline int32_t weight(const uint8_t* q, int64_t j) {
  if constexpr (Type == kQ8_0) return static_cast<int8_t>(q[j]);
  return j < 16 ? (q[j] & 0x0F) : (q[j - 16] >> 4);
}

template <int64_t Type, int NR, int NT>
void dot_tile(const uint8_t* rows, int64_t row_bytes, const Activations& a, const int8_t* qx, const float* dx,
              const float* sx, int64_t k, float* out) {
  for (int r = 0; r < NR; ++r) {
    float acc[NT] = {};
    for (int64_t b = 0; b < a.blocks; ++b) {
      const Block blk = block_at<Type>(rows + r * row_bytes, b);
      int32_t w[kBlock];
      for (int64_t j = 0; j < kBlock; ++j) w[j] = weight<Type>(blk.q, j);
      for (int i = 0; i < NT; ++i) {
        const int8_t* xb = qx + i * k + b * kBlock;
        int32_t sum = 0;
        for (int64_t j = 0; j < kBlock; ++j) sum += w[j] * xb[j];
        acc[i] += blk.d * dx[i * a.blocks + b] * static_cast<float>(sum) + blk.c * sx[i * a.blocks + b];
      }
    }
    for (int i = 0; i < NT; ++i) out[r * NT + i] = acc[i];
  }
}
#endif

template <int64_t Type, int NR, int NT>
void tile(const uint8_t* blocks, int64_t row_bytes, const Activations& a, int64_t n, int64_t t0, int64_t k,
          int64_t out_features, float* out) {
  float result[NR * NT];
  dot_tile<Type, NR, NT>(blocks + n * row_bytes, row_bytes, a, a.q + t0 * k, a.d + t0 * a.blocks,
                         a.s + t0 * a.blocks, k, result);
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < NT; ++i) out[(t0 + i) * out_features + n + r] = result[r * NT + i];
}

// Rows [n0, n1) for tokens [t0, t0 + NT), NR rows at a time.
template <int64_t Type, int NR, int NT>
void row_range(const uint8_t* blocks, int64_t row_bytes, const Activations& a, int64_t n0, int64_t n1, int64_t t0,
               int64_t k, int64_t out_features, float* out) {
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) tile<Type, NR, NT>(blocks, row_bytes, a, n, t0, k, out_features, out);
  for (; n < n1; ++n) tile<Type, 1, NT>(blocks, row_bytes, a, n, t0, k, out_features, out);
}

// One token: four rows a tile; more: two rows by four tokens (the remainder of tokens by fewer).
template <int64_t Type>
void linear_rows(const uint8_t* blocks, int64_t row_bytes, const Activations& a, int64_t tokens, int64_t k,
                 int64_t n0, int64_t n1, int64_t out_features, float* out) {
  if (tokens == 1) return row_range<Type, 4, 1>(blocks, row_bytes, a, n0, n1, 0, k, out_features, out);
  int64_t t = 0;
  for (; t + kTokenTile <= tokens; t += kTokenTile)
    row_range<Type, 2, kTokenTile>(blocks, row_bytes, a, n0, n1, t, k, out_features, out);
  switch (tokens - t) {
    case 3: row_range<Type, 2, 3>(blocks, row_bytes, a, n0, n1, t, k, out_features, out); break;
    case 2: row_range<Type, 2, 2>(blocks, row_bytes, a, n0, n1, t, k, out_features, out); break;
    case 1: row_range<Type, 4, 1>(blocks, row_bytes, a, n0, n1, t, k, out_features, out); break;
  }
}

void check_blocks(const at::Tensor& blocks, int64_t type, int64_t in_features) {
  TORCH_CHECK(blocks.device().is_cpu() && blocks.scalar_type() == at::kByte && blocks.dim() == 2 &&
                  blocks.is_contiguous(), "blocks: must be a contiguous CPU uint8 [rows, row_bytes] tensor");
  TORCH_CHECK(in_features % kBlock == 0, "in_features: ", in_features, " is not a multiple of ", kBlock);
  TORCH_CHECK(blocks.size(1) == in_features / kBlock * block_bytes(type), "blocks: ", blocks.size(1),
              " bytes a row do not hold ", in_features, " inputs of type ", type);
}

// x [T, K] float32 times the [N, K] weight the blocks hold: [T, N] float32.
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
void dequantize_row(const uint8_t* row, int64_t blocks, float* out) {
  for (int64_t b = 0; b < blocks; ++b) {
    const Block blk = block_at<Type>(row, b);
    float* ob = out + b * kBlock;
    for (int64_t j = 0; j < 16; ++j) {
      if constexpr (Type == kQ8_0) {
        ob[j] = blk.d * static_cast<int8_t>(blk.q[j]);
        ob[j + 16] = blk.d * static_cast<int8_t>(blk.q[j + 16]);
      } else {
        ob[j] = blk.d * (blk.q[j] & 0x0F) + blk.c;
        ob[j + 16] = blk.d * (blk.q[j] >> 4) + blk.c;
      }
    }
  }
}

// The float32 [rows, K] weight the blocks hold.
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
  m.def("linear", &linear, "x [T, K] float32 times the weight held in GGUF blocks [N, row_bytes]: [T, N]");
  m.def("dequantize", &dequantize, "GGUF blocks [R, row_bytes] -> float32 [R, K]");
  m.def("isa", &isa, "the instruction set this build was compiled for");
}
