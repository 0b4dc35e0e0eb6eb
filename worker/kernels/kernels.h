// The native kernels' entry points, shared by the sources of the one extension kernels/build.py compiles per
// instruction set (bindings.cpp exposes them to Python). Contracts are stated where each is defined.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace radixserve {

// block_gemm.cpp: products with GGUF blocks held in the x8 layout.
at::Tensor block_linear(const at::Tensor& x, const at::Tensor& blocks, int64_t type, int64_t out_features);
at::Tensor block_dequantize(const at::Tensor& blocks, int64_t type, int64_t in_features);
const char* isa();

// step_ops.cpp: a step's other kernels.
at::Tensor paged_attention(at::Tensor q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
                           at::Tensor page_table, at::Tensor query_seqs, at::Tensor context_lens, int64_t page_size,
                           double scale);
at::Tensor rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                    double eps);
void rotary_(const at::Tensor& x, at::Tensor positions, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor silu_mul(const at::Tensor& gate_up);

// decoder.cpp: a Llama decoder's layers for a step's tokens, in one call.
struct BlockLinear {
  at::Tensor blocks;
  int64_t type;
  int64_t out_features;

  at::Tensor operator()(const at::Tensor& x) const { return block_linear(x, blocks, type, out_features); }
};

struct DecoderLayerWeights {
  at::Tensor input_norm, post_attention_norm;
  BlockLinear qkv, o, gate_up, down;
};

class DecoderStack {
 public:
  DecoderStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double scale, at::Tensor cos,
               at::Tensor sin);
  void add_layer(const at::Tensor& input_norm, const at::Tensor& post_attention_norm, const BlockLinear& qkv,
                 const BlockLinear& o, const BlockLinear& gate_up, const BlockLinear& down);
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& positions,
                                             const std::vector<at::Tensor>& k_caches,
                                             const std::vector<at::Tensor>& v_caches,
                                             const std::vector<at::Tensor>& k_scales,
                                             const std::vector<at::Tensor>& v_scales, const at::Tensor& slot_mapping,
                                             const at::Tensor& page_table, const at::Tensor& query_seqs,
                                             const at::Tensor& context_lens, int64_t page_size) const;

 private:
  int64_t num_heads_, num_kv_heads_, head_dim_;
  double eps_, scale_;
  at::Tensor cos_, sin_;
  std::vector<DecoderLayerWeights> layers_;
};

}  // namespace radixserve
