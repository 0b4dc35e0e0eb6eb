// The decoder's per-step kernels on CPU (built with -march=native, keyed by the CPU's flags):
// - decode attention straight from the paged KV cache: one query token per sequence, keys and values read in
//   place through the page table (no gathered copy of the context); one task per sequence serves every query
//   head while each key/value row is read once;
// - RMSNorm with the residual add fused in, rotary embedding in place, and SwiGLU's silu(gate) * up: each one
//   pass over its rows instead of the several torch operations (and temporaries) they take unfused.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// dot(a, b), out += p * b and the softmax's exponentials, in a fixed summation order whatever the batch.
// AVX2/FMA when the build machine has them (-march=native), plain loops otherwise.
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= n; d += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), acc1);
  }
  const __m256 acc = _mm256_add_ps(acc0, acc1);
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_shuffle_ps(sum, sum, 1));
  float total = _mm_cvtss_f32(sum);
  for (; d < n; ++d) total += a[d] * b[d];
  return total;
}

// exp(x) for x <= 0 (Cephes' polynomial, about 1e-7 relative error); underflows to 0 below -87.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(exponent));
}

// s[t] = exp(s[t] - shift) in place; returns the sum.
inline float exp_shifted(float* s, int64_t n, float shift) {
  const __m256 offset = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + t), offset));
    _mm256_storeu_ps(s + t, e);
    acc = _mm256_add_ps(acc, e);
  }
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_shuffle_ps(sum, sum, 1));
  float total = _mm_cvtss_f32(sum);
  for (; t < n; ++t) {
    s[t] = std::exp(s[t] - shift);
    total += s[t];
  }
  return total;
}

inline void axpy(float p, const float* b, float* out, int64_t n) {
  const __m256 scale = _mm256_set1_ps(p);
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    _mm256_storeu_ps(out + d, _mm256_fmadd_ps(scale, _mm256_loadu_ps(b + d), _mm256_loadu_ps(out + d)));
  for (; d < n; ++d) out[d] += p * b[d];
}
#else
inline float dot(const float* a, const float* b, int64_t n) {
  float total = 0.f;
  for (int64_t d = 0; d < n; ++d) total += a[d] * b[d];
  return total;
}

inline void axpy(float p, const float* b, float* out, int64_t n) {
  for (int64_t d = 0; d < n; ++d) out[d] += p * b[d];
}

inline float exp_shifted(float* s, int64_t n, float shift) {
  float total = 0.f;
  for (int64_t t = 0; t < n; ++t) {
    s[t] = std::exp(s[t] - shift);
    total += s[t];
  }
  return total;
}
#endif

// Reduced-precision caches are widened one row at a time.
template <typename scalar_t>
inline const float* as_float(const scalar_t* row, int64_t n, std::vector<float>& buffer) {
  buffer.resize(n);
  for (int64_t d = 0; d < n; ++d) buffer[d] = static_cast<float>(row[d]);
  return buffer.data();
}

template <>
inline const float* as_float<float>(const float* row, int64_t, std::vector<float>&) {
  return row;
}

// All query heads of one sequence: each key/value row (every KV head of a token) is read once.
template <typename scalar_t>
void decode_sequence(const float* q, const scalar_t* k_cache, const scalar_t* v_cache, const int64_t* pages,
                     int64_t context_len, int64_t page_size, int64_t num_heads, int64_t num_kv_heads,
                     int64_t head_dim, float scale, float* out, std::vector<float>& scores,
                     std::vector<float>& row) {
  const int64_t group = num_heads / num_kv_heads, row_stride = num_kv_heads * head_dim;
  scores.resize(num_heads * context_len);
  for (int64_t t = 0; t < context_len; ++t) {
    const int64_t slot = pages[t / page_size] * page_size + t % page_size;
    const float* key = as_float(k_cache + slot * row_stride, row_stride, row);
    for (int64_t h = 0; h < num_heads; ++h)
      scores[h * context_len + t] = dot(q + h * head_dim, key + (h / group) * head_dim, head_dim) * scale;
  }
  for (int64_t h = 0; h < num_heads; ++h) {
    float* s = scores.data() + h * context_len;
    const float inv_total = 1.f / exp_shifted(s, context_len, *std::max_element(s, s + context_len));
    for (int64_t t = 0; t < context_len; ++t) s[t] *= inv_total;
  }
  std::fill(out, out + num_heads * head_dim, 0.f);
  for (int64_t t = 0; t < context_len; ++t) {
    const int64_t slot = pages[t / page_size] * page_size + t % page_size;
    const float* value = as_float(v_cache + slot * row_stride, row_stride, row);
    for (int64_t h = 0; h < num_heads; ++h)
      axpy(scores[h * context_len + t], value + (h / group) * head_dim, out + h * head_dim, head_dim);
  }
}

}  // namespace

// q [B, Hq, D] float32; caches [num_slots, Hkv, D]; page_table [B, max_pages] int64; context_lens [B] int64.
// Returns [B, Hq, D] float32.
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor page_table, torch::Tensor context_lens, int64_t page_size,
                                     double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && k_cache.sizes() == v_cache.sizes(), "bad shapes");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  q = q.to(torch::kFloat32).contiguous();
  page_table = page_table.contiguous();
  context_lens = context_lens.contiguous();
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k_cache.size(1);
  const int64_t max_pages = page_table.size(1);
  auto out = torch::empty_like(q);
  const float* q_ptr = q.data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();
  const int64_t* table = page_table.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_cache.scalar_type(), "paged_decode_attention", [&] {
    const scalar_t* k_ptr = k_cache.data_ptr<scalar_t>();
    const scalar_t* v_ptr = v_cache.data_ptr<scalar_t>();
    at::parallel_for(0, num_seqs, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores, row;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t offset = b * num_heads * head_dim;
        decode_sequence<scalar_t>(q_ptr + offset, k_ptr, v_ptr, table + b * max_pages, lens[b], page_size,
                                  num_heads, num_kv_heads, head_dim, static_cast<float>(scale), out_ptr + offset,
                                  scores, row);
      }
    });
  });
  return out;
}

namespace {

void check_rows(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.stride(1) == 1,
              name, ": must be a CPU float32 [rows, n] tensor with contiguous rows");
}

void rms_norm_row(const float* x, const float* weight, int64_t n, float eps, float* out) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
  const float inverse = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * inverse);
}

}  // namespace

// rms_norm(x) * weight for each row of x [T, n]; with a residual [T, n], first residual += x (in place) and the
// norm is of the sum.
torch::Tensor rms_norm(torch::Tensor x, std::optional<torch::Tensor> residual, torch::Tensor weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == torch::kFloat32 && weight.numel() == x.size(1),
              "weight: must be a contiguous float32 [n] tensor");
  const int64_t rows = x.size(0), n = x.size(1);
  if (residual) {
    check_rows(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes(), "residual: shape must equal x's");
  }
  auto out = torch::empty({rows, n}, x.options());
  const float* w = weight.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = x.data_ptr<float>() + r * x.stride(0);
      if (residual) {
        float* sum = residual->data_ptr<float>() + r * residual->stride(0);
        for (int64_t i = 0; i < n; ++i) sum[i] += row[i];
        row = sum;
      }
      rms_norm_row(row, w, n, static_cast<float>(eps), out.data_ptr<float>() + r * n);
    }
  });
  return out;
}

// Rotates x [T, H, D] in place (rows of heads, last dimension contiguous) by the tables' rows at positions [T]:
// x * cos + rotate_half(x) * sin, where sin already carries rotate-half's sign (RotaryEmbedding's tables).
void rotary_(torch::Tensor x, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 3 && x.stride(2) == 1,
              "x: must be a CPU float32 [T, H, D] tensor with contiguous heads");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() && cos.size(1) == x.size(2),
              "cos, sin: must be contiguous [max_len, D] tables");
  positions = positions.contiguous();
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) TORCH_CHECK(0 <= pos[t] && pos[t] < cos.size(0), "positions: out of range");
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos.data_ptr<float>() + pos[t] * dim;
      const float* s = sin.data_ptr<float>() + pos[t] * dim;
      for (int64_t h = 0; h < heads; ++h) {
        float* v = x.data_ptr<float>() + t * x.stride(0) + h * x.stride(1);
        for (int64_t i = 0; i < half; ++i) {
          const float first = v[i], second = v[i + half];
          v[i] = first * c[i] + second * s[i];
          v[i + half] = second * c[i + half] + first * s[i + half];
        }
      }
    }
  });
}

// silu(gate) * up for gate_up [T, 2I] (gate the first I columns): [T, I].
torch::Tensor silu_mul(torch::Tensor gate_up) {
  check_rows(gate_up, "gate_up");
  const int64_t rows = gate_up.size(0), n = gate_up.size(1) / 2;
  auto out = torch::empty({rows, n}, gate_up.options());
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* g = gate_up.data_ptr<float>() + r * gate_up.stride(0);
      float* o = out.data_ptr<float>() + r * n;
      for (int64_t i = 0; i < n; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * g[i + n];
    }
  });
  return out;
}

namespace {

// One token's int8 row of every KV head, widened: out[h * head_dim + d] = values[h * head_dim + d] * scales[h].
inline const float* dequantize_row(const int8_t* values, const float* scales, int64_t num_kv_heads,
                                   int64_t head_dim, std::vector<float>& buffer) {
  buffer.resize(num_kv_heads * head_dim);
  for (int64_t h = 0; h < num_kv_heads; ++h) {
    const float s = scales[h];
    for (int64_t d = 0; d < head_dim; ++d) buffer[h * head_dim + d] = static_cast<float>(values[h * head_dim + d]) * s;
  }
  return buffer.data();
}

// decode_sequence over the int8 cache (worker/kv/int8.py): each key/value row is dequantized once, then serves
// every query head of its KV head.
void decode_sequence_int8(const float* q, const int8_t* k_cache, const int8_t* v_cache, const float* k_scale,
                          const float* v_scale, const int64_t* pages, int64_t context_len, int64_t page_size,
                          int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale, float* out,
                          std::vector<float>& scores, std::vector<float>& row) {
  const int64_t group = num_heads / num_kv_heads, row_stride = num_kv_heads * head_dim;
  scores.resize(num_heads * context_len);
  for (int64_t t = 0; t < context_len; ++t) {
    const int64_t slot = pages[t / page_size] * page_size + t % page_size;
    const float* key = dequantize_row(k_cache + slot * row_stride, k_scale + slot * num_kv_heads, num_kv_heads,
                                      head_dim, row);
    for (int64_t h = 0; h < num_heads; ++h)
      scores[h * context_len + t] = dot(q + h * head_dim, key + (h / group) * head_dim, head_dim) * scale;
  }
  for (int64_t h = 0; h < num_heads; ++h) {
    float* s = scores.data() + h * context_len;
    const float inv_total = 1.f / exp_shifted(s, context_len, *std::max_element(s, s + context_len));
    for (int64_t t = 0; t < context_len; ++t) s[t] *= inv_total;
  }
  std::fill(out, out + num_heads * head_dim, 0.f);
  for (int64_t t = 0; t < context_len; ++t) {
    const int64_t slot = pages[t / page_size] * page_size + t % page_size;
    const float* value = dequantize_row(v_cache + slot * row_stride, v_scale + slot * num_kv_heads, num_kv_heads,
                                        head_dim, row);
    for (int64_t h = 0; h < num_heads; ++h)
      axpy(scores[h * context_len + t], value + (h / group) * head_dim, out + h * head_dim, head_dim);
  }
}

}  // namespace

// paged_decode_attention over an int8 cache: q [B, Hq, D] float32; caches [num_slots, Hkv, D] int8 with their
// float32 scales [num_slots, Hkv]; page_table [B, max_pages] int64; context_lens [B] int64. Returns [B, Hq, D]
// float32.
torch::Tensor paged_decode_attention_int8(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                          torch::Tensor k_scale, torch::Tensor v_scale, torch::Tensor page_table,
                                          torch::Tensor context_lens, int64_t page_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && k_cache.sizes() == v_cache.sizes(), "bad shapes");
  TORCH_CHECK(k_cache.scalar_type() == torch::kInt8 && v_cache.scalar_type() == torch::kInt8, "caches must be int8");
  TORCH_CHECK(k_scale.scalar_type() == torch::kFloat32 && v_scale.scalar_type() == torch::kFloat32 &&
              k_scale.sizes() == k_cache.sizes().slice(0, 2) && v_scale.sizes() == k_scale.sizes(),
              "scales must be float32 [num_slots, Hkv]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_scale.is_contiguous() &&
              v_scale.is_contiguous(), "caches and scales must be contiguous");
  q = q.to(torch::kFloat32).contiguous();
  page_table = page_table.contiguous();
  context_lens = context_lens.contiguous();
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k_cache.size(1);
  const int64_t max_pages = page_table.size(1);
  auto out = torch::empty_like(q);
  const float* q_ptr = q.data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();
  const int64_t* table = page_table.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int8_t* k_ptr = k_cache.data_ptr<int8_t>();
  const int8_t* v_ptr = v_cache.data_ptr<int8_t>();
  const float* k_scale_ptr = k_scale.data_ptr<float>();
  const float* v_scale_ptr = v_scale.data_ptr<float>();
  at::parallel_for(0, num_seqs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, row;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t offset = b * num_heads * head_dim;
      decode_sequence_int8(q_ptr + offset, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, table + b * max_pages, lens[b],
                           page_size, num_heads, num_kv_heads, head_dim, static_cast<float>(scale),
                           out_ptr + offset, scores, row);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache");
  m.def("rms_norm", &rms_norm, "RMSNorm of each row, the residual added first (in place) when given");
  m.def("rotary_", &rotary_, "rotary embedding of [T, H, D] in place");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of [T, 2I]");
  m.def("paged_decode_attention_int8", &paged_decode_attention_int8,
        "decode attention over a paged int8 KV cache with per-(slot, head) scales");
}
