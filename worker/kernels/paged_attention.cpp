// Decode attention straight from the paged KV cache: one query token per sequence, keys and values read
// in place through the page table (no gathered copy of the context). One task per (sequence, KV head)
// serves that head's whole group of query heads while each key/value row is read once.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;

// A dot product in kLanes independent partial sums (vectorizable without -ffast-math, and the same
// summation order whatever the batch).
template <typename scalar_t>
inline float dot(const float* a, const scalar_t* b, int64_t n) {
  float partial[kLanes] = {0.f};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) partial[j] += a[d + j] * static_cast<float>(b[d + j]);
  float total = 0.f;
  for (; d < n; ++d) total += a[d] * static_cast<float>(b[d]);
  for (int64_t j = 0; j < kLanes; ++j) total += partial[j];
  return total;
}

// All query heads of one sequence: each key/value row (every KV head of a token) is read once.
template <typename scalar_t>
void decode_sequence(const float* q, const scalar_t* k_cache, const scalar_t* v_cache, const int64_t* pages,
                     int64_t context_len, int64_t page_size, int64_t num_heads, int64_t num_kv_heads,
                     int64_t head_dim, float scale, float* out, std::vector<float>& scores) {
  const int64_t group = num_heads / num_kv_heads, row_stride = num_kv_heads * head_dim;
  scores.resize(num_heads * context_len);
  for (int64_t t = 0; t < context_len; ++t) {
    const scalar_t* key = k_cache + (pages[t / page_size] * page_size + t % page_size) * row_stride;
    for (int64_t h = 0; h < num_heads; ++h)
      scores[h * context_len + t] = dot(q + h * head_dim, key + (h / group) * head_dim, head_dim) * scale;
  }
  for (int64_t h = 0; h < num_heads; ++h) {
    float* s = scores.data() + h * context_len;
    const float max_score = *std::max_element(s, s + context_len);
    float total = 0.f;
    for (int64_t t = 0; t < context_len; ++t) {
      s[t] = std::exp(s[t] - max_score);
      total += s[t];
    }
    const float inv_total = 1.f / total;
    for (int64_t t = 0; t < context_len; ++t) s[t] *= inv_total;
  }
  std::fill(out, out + num_heads * head_dim, 0.f);
  for (int64_t t = 0; t < context_len; ++t) {
    const scalar_t* value = v_cache + (pages[t / page_size] * page_size + t % page_size) * row_stride;
    for (int64_t h = 0; h < num_heads; ++h) {
      const float p = scores[h * context_len + t];
      const scalar_t* vh = value + (h / group) * head_dim;
      float* oh = out + h * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) oh[d] += p * static_cast<float>(vh[d]);
    }
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
      std::vector<float> scores;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t offset = b * num_heads * head_dim;
        decode_sequence<scalar_t>(q_ptr + offset, k_ptr, v_ptr, table + b * max_pages, lens[b], page_size,
                                  num_heads, num_kv_heads, head_dim, static_cast<float>(scale), out_ptr + offset,
                                  scores);
      }
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache");
}
