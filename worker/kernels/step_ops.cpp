// The decoder's per-step kernels on CPU:
// - decode attention straight from the paged KV cache: one query token per sequence, keys and values read in
//   place through the page table (no gathered copy of the context); one task per (sequence, KV head) serves the
//   query heads that share it, each key/value row read once;
// - RMSNorm with the residual add fused in, rotary embedding in place, and SwiGLU's silu(gate) * up: each one
//   pass over its rows instead of the several torch operations (and temporaries) they take unfused.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// dot(a, b), out += p * b and the softmax's exponentials, in a fixed summation order whatever the batch.
// AVX2/FMA in the builds that have them (kernels/build.py), plain loops otherwise.
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
// out = silu(g) * u = g * sigmoid(g) * u, sigmoid from e = exp(-|g|): 1 / (1 + e) for g >= 0, e / (1 + e) below.
inline void silu_mul_row(const float* g, const float* u, float* out, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    const __m256 e = exp_nonpositive(_mm256_or_ps(x, sign));  // exp(-|x|)
    const __m256 inverse = _mm256_div_ps(one, _mm256_add_ps(one, e));
    const __m256 sigmoid = _mm256_blendv_ps(inverse, _mm256_mul_ps(e, inverse), x);  // x's sign bit picks e / (1 + e)
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(x, sigmoid), _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) out[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
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
inline void silu_mul_row(const float* g, const float* u, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
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

// The query heads [kv_head * group, (kv_head + 1) * group) of one sequence, which share KV head kv_head: each of
// its key/value rows is read once. q and out are the sequence's [Hq, D] rows.
template <typename scalar_t>
void decode_kv_head(const float* q, const scalar_t* k_cache, const scalar_t* v_cache, const int64_t* pages,
                    int64_t context_len, int64_t page_size, int64_t kv_head, int64_t group, int64_t num_kv_heads,
                    int64_t head_dim, float scale, float* out, std::vector<float>& scores, std::vector<float>& row) {
  const int64_t row_stride = num_kv_heads * head_dim, first = kv_head * group;
  scores.resize(group * context_len);
  for (int64_t t = 0; t < context_len; ++t) {
    const int64_t slot = pages[t / page_size] * page_size + t % page_size;
    const float* key = as_float(k_cache + slot * row_stride + kv_head * head_dim, head_dim, row);
    for (int64_t g = 0; g < group; ++g)
      scores[g * context_len + t] = dot(q + (first + g) * head_dim, key, head_dim) * scale;
  }
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores.data() + g * context_len;
    const float inv_total = 1.f / exp_shifted(s, context_len, *std::max_element(s, s + context_len));
    for (int64_t t = 0; t < context_len; ++t) s[t] *= inv_total;
  }
  std::fill(out + first * head_dim, out + (first + group) * head_dim, 0.f);
  for (int64_t t = 0; t < context_len; ++t) {
    const int64_t slot = pages[t / page_size] * page_size + t % page_size;
    const float* value = as_float(v_cache + slot * row_stride + kv_head * head_dim, head_dim, row);
    for (int64_t g = 0; g < group; ++g)
      axpy(scores[g * context_len + t], value, out + (first + g) * head_dim, head_dim);
  }
}

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1,
              name, ": must be a CPU float32 [rows, n] tensor with contiguous rows");
}

void rms_norm_row(const float* x, const float* weight, int64_t n, float eps, float* out) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
  const float inverse = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * inverse);
}

}  // namespace

namespace radixserve {

// q [B, Hq, D] float32; caches [num_slots, Hkv, D]; page_table [B, max_pages] int64; context_lens [B] int64.
// Returns [B, Hq, D] float32.
at::Tensor paged_decode_attention(at::Tensor q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  at::Tensor page_table, at::Tensor context_lens, int64_t page_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && k_cache.sizes() == v_cache.sizes(), "bad shapes");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  q = q.to(at::kFloat).contiguous();
  page_table = page_table.contiguous();
  context_lens = context_lens.contiguous();
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k_cache.size(1), group = num_heads / num_kv_heads;
  const int64_t max_pages = page_table.size(1);
  at::Tensor out = at::empty_like(q);
  const float* q_ptr = q.data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();
  const int64_t* table = page_table.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_cache.scalar_type(), "paged_decode_attention", [&] {
    const scalar_t* k_ptr = k_cache.data_ptr<scalar_t>();
    const scalar_t* v_ptr = v_cache.data_ptr<scalar_t>();
    at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores, row;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / num_kv_heads, offset = b * num_heads * head_dim;
        decode_kv_head<scalar_t>(q_ptr + offset, k_ptr, v_ptr, table + b * max_pages, lens[b], page_size,
                                 task % num_kv_heads, group, num_kv_heads, head_dim, static_cast<float>(scale),
                                 out_ptr + offset, scores, row);
      }
    });
  });
  return out;
}

// rms_norm(x) * weight for each row of x [T, n]; with a residual [T, n], first residual += x (in place) and the
// norm is of the sum.
at::Tensor rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                    double eps) {
  check_rows(x, "x");
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == at::kFloat && weight.numel() == x.size(1),
              "weight: must be a contiguous float32 [n] tensor");
  const int64_t rows = x.size(0), n = x.size(1);
  if (residual) {
    check_rows(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes(), "residual: shape must equal x's");
  }
  at::Tensor out = at::empty({rows, n}, x.options());
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
void rotary_(const at::Tensor& x, at::Tensor positions, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3 && x.stride(2) == 1,
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
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  const int64_t rows = gate_up.size(0), n = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, n}, gate_up.options());
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* g = gate_up.data_ptr<float>() + r * gate_up.stride(0);
      silu_mul_row(g, g + n, out.data_ptr<float>() + r * n, n);
    }
  });
  return out;
}

}  // namespace radixserve
