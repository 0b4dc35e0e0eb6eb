"""How a linear layer holds and applies its weight: dense float, int8 and int4 weight-only, GGUF blocks.

A ``LinearMethod`` is stateless about weights: the layer owns the tensors and the method works on them in three
steps, called in this order:

1. ``create_weights`` registers the parameter ``weight`` [output, input] the checkpoint is loaded into: the
   layer's shard-aware ``weight_loader`` narrows each checkpoint tensor to this rank's slice and hands it to
   ``load_weight`` (a float copy for every method but ``gguf``, which keeps the file's blocks);
2. ``process_weights_after_loading`` turns this rank's loaded slice into the method's form (quantized buffers
   and scales, the float parameter dropped), so per-channel and per-group scales are always those of the
   rank's own shard;
3. ``apply`` computes ``x W^T + b``, and ``embed`` looks rows up (for an embedding table, whose rows the tied LM
   head multiplies by).

Quantized methods run torch's weight-only kernels (``aten._weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``),
which take bfloat16 activations on CPU: ``apply`` casts to bfloat16 and back, and keeps scales in bfloat16. Those
kernels only serve some shapes (measured on torch 2.13: the int8 one returns wrong sums, or crashes, when the
input size is not a multiple of 8, and the int4 one needs the output size to be a multiple of 16), so a layer
whose shape they do not take (``KERNEL_INPUT_MULTIPLE``, ``INT4_KERNEL_OUTPUT_MULTIPLE``) computes the same
product from its dequantized weight instead: slower, never wrong.

* ``int8``: symmetric, one scale per output row: ``w ~ q * scale``, ``q`` in [-127, 127].
* ``int4``: asymmetric, one scale and minimum per ``group_size`` inputs of a row: ``w ~ q * scale + min``, ``q`` in
  [0, 15]. A table that rows are looked up in (the embedding, and so the tied LM head) is held in int8 instead,
  whose rows dequantize on their own.
* ``gguf``: the GGUF file's own Q8_0 / Q4_0 / Q4_1 blocks, as stored (``checkpoint.weights(blocks=True)``), run by
  our kernels (``kernels.blocks``, int8-rounded activations, as llama.cpp does) for every token. Each output of the
  kernel is one fixed sequence of roundings whatever the batch, so with the attention kernel's same property a
  token's result does not depend on caching, chunking or batching; the float GEMM's does (its blocking follows
  the batch), and int8 rounding of activations turns such last-bit differences into whole steps, measured. A
  weight the file holds in another type (F32, F16, K-quants), or whose fused parts differ in type, is quantized
  to Q8_0.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.cluster.base.config import QUANTIZATIONS
from radixserve.worker.kernels import blocks as block_kernels
from radixserve.worker.models.checkpoint import BlockWeight

KERNEL_INPUT_MULTIPLE = 64  # torch's int8 kernel is right for multiples of 8 here; 64 leaves room for wider ISAs
INT4_KERNEL_OUTPUT_MULTIPLE = 16
INT4_GROUP_SIZES = (32, 64, 128)  # the smallest that divides a layer's input size is used (the best quality)


class LinearMethod(ABC):
    """See the module docstring. ``name`` is the ``engine.quantization`` value that picks it."""

    name: ClassVar[str]
    takes_blocks: ClassVar[bool] = False  # whether checkpoints should hand over quantized blocks as stored

    def create_weights(self, layer: nn.Module, output_size: int, input_size: int) -> None:
        """Register ``layer.weight``, the float [output_size, input_size] parameter checkpoints load into."""
        layer.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)

    def load_weight(self, layer: nn.Module, loaded: torch.Tensor | BlockWeight, row_offset: int) -> None:
        """Copy this rank's slice of a checkpoint tensor into rows [row_offset, ...) of ``layer.weight``."""
        if isinstance(loaded, BlockWeight):
            loaded = loaded.dequantize()
        copy_checked(layer.weight.data.narrow(0, row_offset, loaded.shape[0]), loaded, "weight")

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Turn the loaded ``layer.weight`` into this method's form (nothing to do for dense)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [T, input] W^T + bias`` -> [T, output], in ``x``'s dtype."""

    @abstractmethod
    def embed(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the weight, as float32 [len(ids), input]."""

    def for_table(self) -> LinearMethod:
        """The method for a table that rows are looked up in (embedding, tied LM head)."""
        return self


class DenseMethod(LinearMethod):
    """The float weight as loaded (cast to the engine's dtype by the loader)."""

    name = "none"

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)

    def embed(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, layer.weight)


class Int8Method(LinearMethod):
    """int8 weight-only, symmetric per output row (buffers ``qweight`` int8 [N, K], ``scales`` bf16 [N])."""

    name = "int8"

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        qweight, scales = quantize_int8(layer.weight.data.float())
        del layer.weight
        layer.register_buffer("qweight", qweight)
        layer.register_buffer("scales", scales.to(torch.bfloat16))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.qweight.shape[1] % KERNEL_INPUT_MULTIPLE:
            return F.linear(x, dequantize_int8(layer.qweight, layer.scales).to(x.dtype), bias)
        out = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), layer.qweight, layer.scales).to(x.dtype)
        return out if bias is None else out + bias

    def embed(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return dequantize_int8(layer.qweight[ids], layer.scales[ids])


class Int4Method(LinearMethod):
    """int4 weight-only, asymmetric per group of inputs (buffers ``qweight``, torch's packed layout, or for an
    output size the kernel does not take the values themselves, uint8 [N, K]; ``scales_and_zeros`` bf16
    [K / group, N, 2]); ``group_size`` None: the smallest of ``INT4_GROUP_SIZES`` that
    divides the layer's input size (32 matches the blocks of GGUF's Q4_0 / Q4_1, so such a file's weights
    quantize back onto their own grid)."""

    name = "int4"

    def __init__(self, group_size: int | None = None) -> None:
        if group_size is not None and group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group_size: must be one of {INT4_GROUP_SIZES}, got {group_size}")
        self.group_size = group_size

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        weight = layer.weight.data.float()
        group_size = self.group_size or _group_size_for(weight.shape[1])
        q, scales, minimums = quantize_int4(weight, group_size)
        del layer.weight
        layer.group_size = group_size
        layer.int4_packed = q.shape[0] % INT4_KERNEL_OUTPUT_MULTIPLE == 0
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1) if layer.int4_packed else q.to(torch.uint8)
        layer.register_buffer("qweight", packed)
        layer.register_buffer("scales_and_zeros", int4_scales_and_zeros(scales, minimums))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not layer.int4_packed:
            weight = dequantize_int4(layer.qweight, layer.scales_and_zeros, layer.group_size)
            return F.linear(x, weight.to(x.dtype), bias)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), layer.qweight, layer.group_size,
                                                         layer.scales_and_zeros).to(x.dtype)
        return out if bias is None else out + bias

    def embed(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("int4 tables are held in int8 (LinearMethod.for_table)")

    def for_table(self) -> LinearMethod:
        return Int8Method()


class GGUFMethod(LinearMethod):
    """The file's blocks (buffer ``blocks``, the file's bytes regrouped in the kernels' x8 layout,
    ``kernels.blocks.repack``; attributes ``block_type``, ``in_features`` and ``out_features``); see the
    module docstring. The float ``weight`` parameter is a meta-device placeholder: no float copy of the weight is
    held, except for tensors the file does not hold in blocks, while they are quantized."""

    name = "gguf"
    takes_blocks = True
    fallback_type = block_kernels.BLOCK_TYPES["Q8_0"]

    def create_weights(self, layer: nn.Module, output_size: int, input_size: int) -> None:
        layer.weight = nn.Parameter(torch.empty(output_size, input_size, device="meta"), requires_grad=False)
        layer.block_parts = []

    def load_weight(self, layer: nn.Module, loaded: torch.Tensor | BlockWeight, row_offset: int) -> None:
        rows, columns = loaded.shape
        if columns != layer.weight.shape[1] or row_offset + rows > layer.weight.shape[0]:
            raise ValueError(f"weight: checkpoint shape {tuple(loaded.shape)} does not fit rows [{row_offset}, "
                             f"{row_offset + rows}) of {tuple(layer.weight.shape)}")
        layer.block_parts.append((row_offset, loaded))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        parts = [part for _, part in sorted(layer.block_parts, key=lambda item: item[0])]
        types = {part.block_type if isinstance(part, BlockWeight) else None for part in parts}
        block_type = types.pop() if len(types) == 1 else None
        if block_type is None:
            block_type = self.fallback_type
            parts = [BlockWeight(block_kernels.quantize(_float(part), block_type), block_type, layer.weight.shape[1])
                     for part in parts]
        layer.register_buffer("blocks", block_kernels.repack(torch.cat([part.data for part in parts]), block_type))
        layer.block_type, (layer.out_features, layer.in_features) = block_type, layer.weight.shape
        del layer.weight, layer.block_parts

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = block_kernels.linear(x.float(), layer.blocks, layer.block_type, layer.out_features)
        return (out if bias is None else out + bias.float()).to(x.dtype)

    def embed(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return block_kernels.dequantize_rows(layer.blocks, layer.block_type, layer.in_features, ids)


def resolve_quantization(quantization: str, checkpoint_has_blocks: bool, device: str) -> str:
    """``engine.quantization`` with ``"auto"`` made concrete: ``"gguf"`` for a checkpoint holding GGUF blocks on
    CPU, ``"none"`` otherwise; any other value as given."""
    if quantization != "auto":
        return quantization
    return "gguf" if checkpoint_has_blocks and device == "cpu" else "none"


def make_linear_method(quantization: str) -> LinearMethod:
    """The method ``engine.quantization`` names (``"auto"`` resolved first: ``resolve_quantization``);
    ValueError names the field otherwise."""
    methods: dict[str, type[LinearMethod]] = {m.name: m for m in (DenseMethod, Int8Method, Int4Method, GGUFMethod)}
    if quantization not in methods:
        raise ValueError(f"quantization: must be one of {QUANTIZATIONS} (auto resolved), got {quantization!r}")
    return methods[quantization]()


def copy_checked(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    """``dst.copy_(src)``, or ValueError naming ``name`` when the shapes differ."""
    if dst.shape != src.shape:
        raise ValueError(f"{name}: checkpoint shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
    dst.copy_(src)


def _float(weight: torch.Tensor | BlockWeight) -> torch.Tensor:
    return weight.dequantize() if isinstance(weight, BlockWeight) else weight.float()


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``(q int8 [N, K], scales float [N])`` with ``weight ~ q * scales[:, None]``."""
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(weight / scales.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 rows of int8 ``q`` [N, K] under per-row ``scales`` [N]."""
    return q.float() * scales.float().unsqueeze(-1)


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per ``group_size`` inputs of a row: ``(q int32 [N, K] in [0, 15], scales [N, K / g],
    minimums [N, K / g])`` with ``weight[n, k] ~ q[n, k] * scales[n, k // g] + minimums[n, k // g]``."""
    rows, cols = weight.shape
    if cols % group_size:
        raise ValueError(f"group_size: {group_size} does not divide the input size {cols}")
    groups = weight.view(rows, cols // group_size, group_size)
    minimums, maximums = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((maximums - minimums) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round((groups - minimums.unsqueeze(-1)) / scales.unsqueeze(-1)).clamp(0, 15)
    return q.to(torch.int32).view(rows, cols), scales, minimums


def int4_scales_and_zeros(scales: torch.Tensor, minimums: torch.Tensor) -> torch.Tensor:
    """torch's int4 kernels compute ``(q - 8) * scale + zero``: our ``q * scale + min`` with ``zero = min + 8 *
    scale``, laid out [K / g, N, 2] in bfloat16."""
    return torch.stack([scales, minimums + 8 * scales], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 weight [N, K] of int4 values ``q`` [N, K] (0..15) under torch's ``(q - 8) * scale + zero``."""
    scale, zero = (scales_and_zeros.float().transpose(0, 1).repeat_interleave(group_size, dim=1).unbind(-1))
    return (q.float() - 8) * scale + zero


def _group_size_for(input_size: int) -> int:
    for group_size in INT4_GROUP_SIZES:
        if input_size % group_size == 0:
            return group_size
    raise ValueError(f"int4: no group size of {INT4_GROUP_SIZES} divides the input size {input_size}")
