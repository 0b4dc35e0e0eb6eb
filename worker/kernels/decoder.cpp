// A Llama decoder's layers for a step's tokens in one call: the kernels the Python layers call one at a time
// (models/llama.py), called here in the same order on the same tensors, so the outputs are the same bits. What the
// call removes is the Python and dispatch between them.
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace radixserve {

namespace {

// cache[slots[t]] = rows[t] for each token t; cache [num_slots, Hkv, D] float32, rows [T, Hkv * D] float32.
void write_cache(const at::Tensor& cache, const at::Tensor& rows, const int64_t* slots) {
  const int64_t width = rows.size(1), num_slots = cache.size(0);
  float* base = cache.data_ptr<float>();
  const float* source = rows.data_ptr<float>();
  for (int64_t t = 0; t < rows.size(0); ++t) {
    TORCH_CHECK(0 <= slots[t] && slots[t] < num_slots, "slot_mapping: slot ", slots[t], " is outside the cache");
    std::memcpy(base + slots[t] * width, source + t * rows.stride(0), width * sizeof(float));
  }
}

// The same rows quantized as kv/int8.py quantizes (bit for bit): per KV head, scale = max|x| / 127 and value =
// round(x / scale), half to even, in [-127, 127]; an all-zero row has scale 0 and values 0.
void write_int8_cache(const at::Tensor& cache, const at::Tensor& scales, const at::Tensor& rows,
                      const int64_t* slots) {
  const int64_t num_slots = cache.size(0), heads = cache.size(1), dim = cache.size(2);
  int8_t* values = cache.data_ptr<int8_t>();
  float* row_scales = scales.data_ptr<float>();
  for (int64_t t = 0; t < rows.size(0); ++t) {
    TORCH_CHECK(0 <= slots[t] && slots[t] < num_slots, "slot_mapping: slot ", slots[t], " is outside the cache");
    for (int64_t h = 0; h < heads; ++h) {
      const float* x = rows.data_ptr<float>() + t * rows.stride(0) + h * dim;
      float amax = 0.f;
      for (int64_t d = 0; d < dim; ++d) amax = std::max(amax, std::fabs(x[d]));
      const float scale = amax / 127.f;
      int8_t* out = values + (slots[t] * heads + h) * dim;
      for (int64_t d = 0; d < dim; ++d)
        out[d] = static_cast<int8_t>(scale > 0.f ? std::clamp(std::nearbyint(x[d] / scale), -127.f, 127.f) : 0.f);
      row_scales[slots[t] * heads + h] = scale;
    }
  }
}

// Float32 caches, or int8 ones with their float32 [num_slots, Hkv] scales.
void check_cache(const at::Tensor& cache, const at::Tensor* scales, int64_t num_kv_heads, int64_t head_dim) {
  const auto dtype = scales ? at::kChar : at::kFloat;
  TORCH_CHECK(cache.device().is_cpu() && cache.scalar_type() == dtype && cache.is_contiguous() && cache.dim() == 3 &&
                  cache.size(1) == num_kv_heads && cache.size(2) == head_dim,
              "caches: each must be a contiguous CPU ", scales ? "int8" : "float32", " [num_slots, ", num_kv_heads,
              ", ", head_dim, "] tensor");
  TORCH_CHECK(!scales || (scales->scalar_type() == at::kFloat && scales->is_contiguous() &&
                          scales->sizes() == cache.sizes().slice(0, 2)),
              "scales: each must be a contiguous float32 [num_slots, ", num_kv_heads, "] tensor");
}

}  // namespace

DecoderStack::DecoderStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double scale,
                           at::Tensor cos, at::Tensor sin)
    : num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim), eps_(eps), scale_(scale),
      cos_(std::move(cos)), sin_(std::move(sin)) {
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "num_heads: ", num_heads,
              " is not a multiple of num_kv_heads ", num_kv_heads);
}

void DecoderStack::add_layer(const at::Tensor& input_norm, const at::Tensor& post_attention_norm,
                             const BlockLinear& qkv, const BlockLinear& o, const BlockLinear& gate_up,
                             const BlockLinear& down) {
  TORCH_CHECK(qkv.out_features == (num_heads_ + 2 * num_kv_heads_) * head_dim_, "qkv: ", qkv.out_features,
              " outputs are not the heads' ", (num_heads_ + 2 * num_kv_heads_) * head_dim_);
  TORCH_CHECK(gate_up.out_features % 2 == 0, "gate_up: an odd number of outputs, ", gate_up.out_features);
  layers_.push_back({input_norm, post_attention_norm, qkv, o, gate_up, down});
}

// x [T, hidden] float32 (the embeddings; it becomes the residual stream, updated in place); the caches of every
// layer, float32, or int8 with their scales (empty lists for float32 caches); slot_mapping [T] int64 where each
// token's key and value go; page_table, query_seqs and context_lens as paged_attention takes them. Returns the last
// layer's (output, residual), unsummed.
std::tuple<at::Tensor, at::Tensor> DecoderStack::forward(const at::Tensor& x, const at::Tensor& positions,
                                                         const std::vector<at::Tensor>& k_caches,
                                                         const std::vector<at::Tensor>& v_caches,
                                                         const std::vector<at::Tensor>& k_scales,
                                                         const std::vector<at::Tensor>& v_scales,
                                                         const at::Tensor& slot_mapping, const at::Tensor& page_table,
                                                         const at::Tensor& query_seqs, const at::Tensor& context_lens,
                                                         int64_t page_size) const {
  TORCH_CHECK(k_caches.size() == layers_.size() && v_caches.size() == layers_.size(), "caches: ", k_caches.size(),
              " and ", v_caches.size(), " for ", layers_.size(), " layers");
  const bool quantized = !k_scales.empty();
  TORCH_CHECK(!quantized || (k_scales.size() == layers_.size() && v_scales.size() == layers_.size()), "scales: ",
              k_scales.size(), " and ", v_scales.size(), " for ", layers_.size(), " layers");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat, "x: must be contiguous float32 "
              "[tokens, hidden]");
  const int64_t tokens = x.size(0), q_size = num_heads_ * head_dim_, kv_size = num_kv_heads_ * head_dim_;
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == tokens, "slot_mapping: must be contiguous int64 [tokens]");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  at::Tensor hidden = x, residual;
  for (size_t i = 0; i < layers_.size(); ++i) {
    const DecoderLayerWeights& layer = layers_[i];
    const std::optional<at::Tensor> k_scale = quantized ? std::optional(k_scales[i]) : std::nullopt;
    const std::optional<at::Tensor> v_scale = quantized ? std::optional(v_scales[i]) : std::nullopt;
    check_cache(k_caches[i], quantized ? &*k_scale : nullptr, num_kv_heads_, head_dim_);
    check_cache(v_caches[i], quantized ? &*v_scale : nullptr, num_kv_heads_, head_dim_);
    at::Tensor normed;
    if (i == 0) {
      residual = hidden;
      normed = rms_norm(hidden, std::nullopt, layer.input_norm, eps_);
    } else {
      normed = rms_norm(hidden, residual, layer.input_norm, eps_);
    }
    const at::Tensor qkv = layer.qkv(normed);
    rotary_(qkv.narrow(1, 0, q_size + kv_size).view({tokens, num_heads_ + num_kv_heads_, head_dim_}), positions,
            cos_, sin_);
    const at::Tensor k = qkv.narrow(1, q_size, kv_size), v = qkv.narrow(1, q_size + kv_size, kv_size);
    if (quantized) {
      write_int8_cache(k_caches[i], *k_scale, k, slots);
      write_int8_cache(v_caches[i], *v_scale, v, slots);
    } else {
      write_cache(k_caches[i], k, slots);
      write_cache(v_caches[i], v, slots);
    }
    const at::Tensor attention =
        paged_attention(qkv.narrow(1, 0, q_size).view({tokens, num_heads_, head_dim_}), k_caches[i], v_caches[i],
                        k_scale, v_scale, page_table, query_seqs, context_lens, page_size, scale_);
    normed = rms_norm(layer.o(attention.view({tokens, q_size})), residual, layer.post_attention_norm, eps_);
    hidden = layer.down(silu_mul(layer.gate_up(normed)));
  }
  return {hidden, residual};
}

}  // namespace radixserve
