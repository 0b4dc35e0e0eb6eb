// The decoder's per-step kernels on CPU:
// - attention straight from the paged KV cache, float or int8 (kv/int8.py): every query, decode token or
//   prompt token, attends to the first context_len tokens of its sequence, read in place through the page table
//   (no gathered copy of the context). Each (query, head) is one fixed sequence of operations over its keys in
//   order, so its result does not depend on the step: cached or not, chunked or not, batched or not, the bits are
//   the same. A task is a tile of up to kQueryTile consecutive queries of a sequence with one KV head, which
//   serves the query heads that share it: each key/value row is read once a tile;
// - RMSNorm with the residual add fused in, rotary embedding in place, and SwiGLU's silu(gate) * up: each one
//   pass over its rows instead of the several torch operations (and temporaries) they take unfused.
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// Scores of eight keys, weighted sums of values and the softmax's exponentials, each in one fixed summation order
// whatever the batch: AVX2/FMA in the builds that have them (kernels/build.py), plain loops otherwise. The plain
// loops also serve the head sizes the vector paths do not take.
inline void dot8_plain(const float* q, const float* const* keys, int64_t n, float* out) {
  for (int j = 0; j < 8; ++j) {
    float total = 0.f;
    for (int64_t d = 0; d < n; ++d) total += q[d] * keys[j][d];
    out[j] = total;
  }
}

inline void accumulate_plain(const float* p, const float* const* values, int64_t count, int64_t n, float* out) {
  for (int64_t t = 0; t < count; ++t)
    for (int64_t d = 0; d < n; ++d) out[d] += p[t] * values[t][d];
}

inline void silu_mul_plain(const float* g, const float* u, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

// Lane j: the total of v[j]'s eight lanes, each summed ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7)).
inline __m256 reduce8(const __m256 (&v)[8]) {
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// out[j] = q . keys[j] for eight keys (head_dim n): q is read once for all eight.
inline void dot8(const float* q, const float* const* keys, int64_t n, float* out) {
  if (n % 8) {
    dot8_plain(q, keys, n, out);
    return;
  }
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < n; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys[j] + d), acc[j]);
  }
  _mm256_storeu_ps(out, reduce8(acc));
}

// out += sum over t < count of p[t] * values[t] (head_dim n), in order of t, the output held in registers: the
// same roundings as one pass over all of a context's values, whichever blocks of keys the calls take.
inline void accumulate(const float* p, const float* const* values, int64_t count, int64_t n, float* out) {
  if (n % 8) {
    accumulate_plain(p, values, count, n, out);
    return;
  }
  constexpr int64_t kChunk = 64;  // dimensions a pass keeps in eight registers
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t regs = std::min<int64_t>(kChunk, n - c) / 8;
    __m256 acc[8];
    for (int64_t r = 0; r < regs; ++r) acc[r] = _mm256_loadu_ps(out + c + 8 * r);
    for (int64_t t = 0; t < count; ++t) {
      const __m256 weight = _mm256_set1_ps(p[t]);
      for (int64_t r = 0; r < regs; ++r) acc[r] = _mm256_fmadd_ps(weight, _mm256_loadu_ps(values[t] + c + 8 * r), acc[r]);
    }
    for (int64_t r = 0; r < regs; ++r) _mm256_storeu_ps(out + c + 8 * r, acc[r]);
  }
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
  silu_mul_plain(g + i, u + i, out + i, n - i);
}
#else
inline void dot8(const float* q, const float* const* keys, int64_t n, float* out) { dot8_plain(q, keys, n, out); }

inline void accumulate(const float* p, const float* const* values, int64_t count, int64_t n, float* out) {
  accumulate_plain(p, values, count, n, out);
}

inline float exp_shifted(float* s, int64_t n, float shift) {
  float total = 0.f;
  for (int64_t t = 0; t < n; ++t) {
    s[t] = std::exp(s[t] - shift);
    total += s[t];
  }
  return total;
}
inline void silu_mul_row(const float* g, const float* u, float* out, int64_t n) { silu_mul_plain(g, u, out, n); }
#endif

// A cache's rows (one token's key or value for one KV head) as float32: a float32 cache's in place, others widened
// into the caller's buffer (head_dim floats).
template <typename scalar_t>
struct CacheRows {
  const scalar_t* data;
  int64_t num_kv_heads, head_dim;

  const float* row(int64_t slot, int64_t head, float* buffer) const {
    const scalar_t* r = data + (slot * num_kv_heads + head) * head_dim;
    if constexpr (std::is_same_v<scalar_t, float>) {
      return r;
    } else {
      for (int64_t d = 0; d < head_dim; ++d) buffer[d] = static_cast<float>(r[d]);
      return buffer;
    }
  }
};

// An int8 cache with one float32 scale per (slot, KV head): value * scale, as kv/int8.py dequantizes.
struct Int8Rows {
  const int8_t* data;
  const float* scales;
  int64_t num_kv_heads, head_dim;

  const float* row(int64_t slot, int64_t head, float* buffer) const {
    const int8_t* r = data + (slot * num_kv_heads + head) * head_dim;
    const float s = scales[slot * num_kv_heads + head];
    for (int64_t d = 0; d < head_dim; ++d) buffer[d] = static_cast<float>(r[d]) * s;
    return buffer;
  }
};

// Per-task buffers: the context's key and value rows (pointers, and storage for rows widened from the cache) and
// the scores.
struct TaskBuffers {
  std::vector<const float*> keys, values;
  std::vector<float> key_storage, value_storage, scores;
};

// The first `count` rows of a sequence's context for one KV head, through its page table.
template <typename Rows>
void context_rows(const Rows& rows, const int64_t* pages, int64_t page_size, int64_t head, int64_t count,
                  std::vector<const float*>& out, std::vector<float>& storage) {
  const int64_t dim = rows.head_dim;
  out.resize(count);
  storage.resize(count * dim);
  for (int64_t t = 0; t < count; ++t)
    out[t] = rows.row(pages[t / page_size] * page_size + t % page_size, head, storage.data() + t * dim);
}

constexpr int64_t kQueryTile = 16;

// Consecutive queries [first, first + count) of one sequence (its page table row `pages`).
struct QueryTile {
  int64_t first, count;
  const int64_t* pages;
};

struct AttentionShape {
  int64_t num_heads, num_kv_heads, head_dim, page_size;
  float scale;
};

// A tile's queries, heads [kv_head * group, (kv_head + 1) * group), against their contexts: the context's rows are
// gathered (widened) once for the tile, and taken kKeyBlock keys at a time by every query and head of the tile
// while they are in L1; scores come eight keys at a time. q and out are [T, Hq, D].
template <typename Rows>
void attend_tile(const float* q, const QueryTile& tile, const int64_t* context_lens, const Rows& keys,
                 const Rows& values, int64_t kv_head, const AttentionShape& shape, float* out, TaskBuffers& buffers) {
  constexpr int64_t kKeyBlock = 64;
  const int64_t group = shape.num_heads / shape.num_kv_heads, head_dim = shape.head_dim, first_head = kv_head * group;
  const int64_t* lens = context_lens + tile.first;
  const int64_t longest = *std::max_element(lens, lens + tile.count), padded = (longest + 7) / 8 * 8;
  context_rows(keys, tile.pages, shape.page_size, kv_head, longest, buffers.keys, buffers.key_storage);
  context_rows(values, tile.pages, shape.page_size, kv_head, longest, buffers.values, buffers.value_storage);
  buffers.keys.resize(padded, buffers.keys[longest - 1]);  // scores of the padding keys are never read
  buffers.scores.resize(tile.count * group * padded);
  auto head_row = [&](auto* base, int64_t i, int64_t g) {  // query i's head first_head + g in q or out
    return base + ((tile.first + i) * shape.num_heads + first_head + g) * head_dim;
  };
  auto scores = [&](int64_t i, int64_t g) { return buffers.scores.data() + (i * group + g) * padded; };
  for (int64_t block = 0; block < longest; block += kKeyBlock)
    for (int64_t i = 0; i < tile.count; ++i)
      for (int64_t g = 0; g < group; ++g)
        for (int64_t t = block; t < std::min(block + kKeyBlock, lens[i]); t += 8)
          dot8(head_row(q, i, g), buffers.keys.data() + t, head_dim, scores(i, g) + t);
  for (int64_t i = 0; i < tile.count; ++i) {
    for (int64_t g = 0; g < group; ++g) {
      float* s = scores(i, g);
      for (int64_t t = 0; t < lens[i]; ++t) s[t] *= shape.scale;
      const float inv_total = 1.f / exp_shifted(s, lens[i], *std::max_element(s, s + lens[i]));
      for (int64_t t = 0; t < lens[i]; ++t) s[t] *= inv_total;
      std::fill(head_row(out, i, g), head_row(out, i, g) + head_dim, 0.f);
    }
  }
  for (int64_t block = 0; block < longest; block += kKeyBlock)
    for (int64_t i = 0; i < tile.count; ++i)
      for (int64_t g = 0; g < group; ++g)
        if (block < lens[i])
          accumulate(scores(i, g) + block, buffers.values.data() + block, std::min(kKeyBlock, lens[i] - block),
                     head_dim, head_row(out, i, g));
}

// The step's queries cut into tiles: runs of one sequence, at most kQueryTile long.
std::vector<QueryTile> query_tiles(const int64_t* query_seqs, int64_t tokens, const int64_t* table, int64_t max_pages) {
  std::vector<QueryTile> tiles;
  for (int64_t t = 0; t < tokens; ++t) {
    if (tiles.empty() || query_seqs[t] != query_seqs[t - 1] || tiles.back().count == kQueryTile)
      tiles.push_back({t, 0, table + query_seqs[t] * max_pages});
    ++tiles.back().count;
  }
  return tiles;
}

// Every (tile, KV head) task, dynamically scheduled: a prefill's later tiles attend to longer contexts.
template <typename Rows>
void attend(const float* q, const std::vector<QueryTile>& tiles, const int64_t* context_lens, const Rows& keys,
            const Rows& values, const AttentionShape& shape, float* out) {
  const int64_t tasks = static_cast<int64_t>(tiles.size()) * shape.num_kv_heads;
#pragma omp parallel num_threads(tasks > 1 ? at::get_num_threads() : 1)
  {
    TaskBuffers buffers;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task)
      attend_tile(q, tiles[task / shape.num_kv_heads], context_lens, keys, values, task % shape.num_kv_heads, shape,
                  out, buffers);
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

// q [T, Hq, D] float32: query t attends to the first context_lens[t] tokens of sequence query_seqs[t], whose pages
// are row query_seqs[t] of page_table [S, max_pages] int64 (rows padded with any valid page). Caches [num_slots,
// Hkv, D] in float32, bfloat16 or float16, or int8 with float32 scales [num_slots, Hkv]. Returns [T, Hq, D] float32.
at::Tensor paged_attention(at::Tensor q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
                           at::Tensor page_table, at::Tensor query_seqs, at::Tensor context_lens, int64_t page_size,
                           double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && k_cache.sizes() == v_cache.sizes() &&
                  q.size(2) == k_cache.size(2) && q.size(1) % k_cache.size(1) == 0,
              "q, caches: must be [T, Hq, D] and [num_slots, Hkv, D] with Hq a multiple of Hkv");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches: must be contiguous");
  TORCH_CHECK(page_size > 0, "page_size: must be positive");
  q = q.to(at::kFloat).contiguous();
  page_table = page_table.to(at::kLong).contiguous();
  query_seqs = query_seqs.to(at::kLong).contiguous();
  context_lens = context_lens.to(at::kLong).contiguous();
  const int64_t tokens = q.size(0), max_pages = page_table.size(1), num_slots = k_cache.size(0);
  TORCH_CHECK(query_seqs.numel() == tokens && context_lens.numel() == tokens,
              "query_seqs, context_lens: must hold one entry per query");
  const int64_t* seqs = query_seqs.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t* table = page_table.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(0 <= seqs[t] && seqs[t] < page_table.size(0), "query_seqs: ", seqs[t], " is not a page table row");
    TORCH_CHECK(0 < lens[t] && lens[t] <= max_pages * page_size, "context_lens: ", lens[t],
                " is not in [1, the page table's ", max_pages * page_size, " slots]");
  }
  for (int64_t i = 0; i < page_table.numel(); ++i)
    TORCH_CHECK(0 <= table[i] && (table[i] + 1) * page_size <= num_slots, "page_table: page ", table[i],
                " is outside the cache");
  const AttentionShape shape{q.size(1), k_cache.size(1), q.size(2), page_size, static_cast<float>(scale)};
  const std::vector<QueryTile> tiles = query_tiles(seqs, tokens, table, max_pages);
  at::Tensor out = at::empty_like(q);
  const float* q_ptr = q.data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();
  if (k_cache.scalar_type() == at::kChar) {
    TORCH_CHECK(k_scale && v_scale && k_scale->scalar_type() == at::kFloat && v_scale->scalar_type() == at::kFloat &&
                    k_scale->is_contiguous() && v_scale->is_contiguous() &&
                    k_scale->sizes() == k_cache.sizes().slice(0, 2) && v_scale->sizes() == k_scale->sizes(),
                "k_scale, v_scale: an int8 cache needs contiguous float32 [num_slots, Hkv] scales");
    const Int8Rows keys{k_cache.data_ptr<int8_t>(), k_scale->data_ptr<float>(), shape.num_kv_heads, shape.head_dim};
    const Int8Rows values{v_cache.data_ptr<int8_t>(), v_scale->data_ptr<float>(), shape.num_kv_heads, shape.head_dim};
    attend(q_ptr, tiles, lens, keys, values, shape, out_ptr);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_cache.scalar_type(), "paged_attention", [&] {
    const CacheRows<scalar_t> keys{k_cache.data_ptr<scalar_t>(), shape.num_kv_heads, shape.head_dim};
    const CacheRows<scalar_t> values{v_cache.data_ptr<scalar_t>(), shape.num_kv_heads, shape.head_dim};
    attend(q_ptr, tiles, lens, keys, values, shape, out_ptr);
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
// Positions that are not one int64 per token, or outside the tables, raise ValueError naming them (every caller,
// the decoder stack's too, comes through here before anything is written).
void rotary_(const at::Tensor& x, at::Tensor positions, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3 && x.stride(2) == 1,
              "x: must be a CPU float32 [T, H, D] tensor with contiguous heads");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() && cos.size(1) == x.size(2),
              "cos, sin: must be contiguous [max_len, D] tables");
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  TORCH_CHECK_VALUE(positions.device().is_cpu() && positions.scalar_type() == at::kLong && positions.dim() == 1 &&
                        positions.numel() == tokens,
                    "positions: ", positions.numel(), " for ", tokens, " tokens (must be CPU int64 [tokens])");
  positions = positions.contiguous();
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK_VALUE(0 <= pos[t] && pos[t] < cos.size(0), "positions: ", pos[t], " is outside [0, ", cos.size(0), ")");
  }
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
