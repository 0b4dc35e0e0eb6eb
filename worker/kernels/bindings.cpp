// The Python module of the native kernels (kernels/build.py compiles every source here into it, per instruction
// set). Calls release the GIL: they touch no Python object once their arguments are converted.
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include "kernels.h"

namespace {
using radixserve::BlockLinear;
using radixserve::DecoderStack;
using release = py::call_guard<py::gil_scoped_release>;
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &radixserve::block_linear, release(),
        "x [T, K] float32 times the [N, K] weight held in x8-layout blocks: [T, N]");
  m.def("dequantize", &radixserve::block_dequantize, release(),
        "x8-layout blocks [G, 8 row_bytes] -> float32 [8 G, K]");
  m.def("isa", &radixserve::isa, "the instruction set this build was compiled for");
  m.def("paged_attention", &radixserve::paged_attention, release(),
        "each query's attention to its sequence's context in a paged KV cache (float, or int8 with scales)");
  m.def("rms_norm", &radixserve::rms_norm, release(),
        "RMSNorm of each row, the residual added first (in place) when given");
  m.def("rotary_", &radixserve::rotary_, release(), "rotary embedding of [T, H, D] in place");
  m.def("silu_mul", &radixserve::silu_mul, release(), "silu(gate) * up of [T, 2I]");
  py::class_<BlockLinear>(m, "BlockLinear", py::module_local(),
                          "a linear layer's x8-layout blocks, ggml type id and output count")
      .def(py::init([](at::Tensor blocks, int64_t type, int64_t out_features) {
             return BlockLinear{std::move(blocks), type, out_features};
           }));
  py::class_<DecoderStack>(m, "DecoderStack", py::module_local(),
                           "a Llama decoder's layers for a step's tokens, in one call")
      .def(py::init<int64_t, int64_t, int64_t, double, double, at::Tensor, at::Tensor>(), py::arg("num_heads"),
           py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("eps"), py::arg("scale"), py::arg("cos"),
           py::arg("sin"))
      .def("add_layer", &DecoderStack::add_layer)
      .def("forward", &DecoderStack::forward, release());
}
