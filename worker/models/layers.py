"""Building blocks of the decoder with per-parameter weight loaders.

Every parameter carries a ``weight_loader(param, loaded, shard_id)`` that copies a checkpoint tensor
into its slice of the parameter. Fused layers (QKV, gate/up) declare which checkpoint tensors feed which
rows, and every loader narrows to this rank's shard, so tensor parallelism and expert layers can reuse the
same checkpoints without rewriting the model. Linear layers and the embedding hold and apply their weight
through a ``LinearMethod`` (``models.quantization``): the checkpoint loads into a float weight, then
``process_weights_after_loading`` turns this rank's slice into the method's form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from radixserve.worker import kernels
from radixserve.worker.models.checkpoint import BlockWeight
from radixserve.worker.models.quantization import DenseMethod, LinearMethod, copy_checked


@dataclass(frozen=True)
class Shard:
    """This process's place in a tensor-parallel group (``size`` 1: no parallelism)."""

    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank: must be in [0, {self.size}), got {self.rank}")

    def split(self, n: int, name: str) -> int:
        """This rank's share of ``n`` rows; ``n`` must divide evenly."""
        if n % self.size:
            raise ValueError(f"{name}: {n} is not divisible by the tensor-parallel size {self.size}")
        return n // self.size


def _narrow(loaded: torch.Tensor | BlockWeight, dim: int, shard: Shard) -> torch.Tensor | BlockWeight:
    size = loaded.shape[dim] // shard.size
    return loaded.narrow(dim, shard.rank * size, size)


class ColumnLinear(nn.Module):
    """y = x W^T (+ b), output rows split across ranks; fused from ``output_sizes`` checkpoint tensors.

    With the default ``Shard()`` the layer is replicated (every rank holds all rows).

    ``shard_id`` in the weight loader is the index into ``output_sizes`` of the tensor being loaded.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, shard: Shard = Shard(),
                 method: LinearMethod = DenseMethod()):
        super().__init__()
        self.shard = shard
        self.method = method
        self.local_sizes = [shard.split(n, "output_size") for n in output_sizes]
        method.create_weights(self, sum(self.local_sizes), input_size)
        self.weight.weight_loader = self._load_weight
        self.weight.num_shards = len(output_sizes)  # checkpoint tensors that fill it
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(sum(self.local_sizes)), requires_grad=False)
            self.bias.weight_loader = self._load_bias
            self.bias.num_shards = len(output_sizes)

    def _load_bias(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0) -> None:
        offset = sum(self.local_sizes[:shard_id])
        copy_checked(param.data.narrow(0, offset, self.local_sizes[shard_id]), _narrow(loaded, 0, self.shard),
                     "bias")

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor | BlockWeight, shard_id: int = 0) -> None:
        offset = sum(self.local_sizes[:shard_id])
        self.method.load_weight(self, _narrow(loaded, 0, self.shard), offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)


class RowLinear(nn.Module):
    """y = x W^T (+ b), input columns split across ranks; the caller all-reduces when ``shard.size`` > 1."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, shard: Shard = Shard(),
                 method: LinearMethod = DenseMethod()):
        super().__init__()
        self.shard = shard
        self.method = method
        method.create_weights(self, output_size, shard.split(input_size, "input_size"))
        self.weight.weight_loader = self._load_weight
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self._load_bias

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor | BlockWeight, shard_id: int = 0) -> None:
        self.method.load_weight(self, _narrow(loaded, 1, self.shard), 0)

    def _load_bias(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0) -> None:
        copy_checked(param.data, loaded, "bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Only rank 0 adds the bias so that the all-reduced sum adds it once.
        bias = self.bias if self.shard.rank == 0 else None
        return self.method.apply(self, x, bias)


class VocabEmbedding(nn.Module):
    """Token embedding, replicated on every rank; held by ``method.for_table()``, so that a tied LM head can
    multiply by it (``logits``)."""

    def __init__(self, vocab_size: int, hidden_size: int, method: LinearMethod = DenseMethod()):
        super().__init__()
        self.method = method.for_table()
        self.method.create_weights(self, vocab_size, hidden_size)
        self.weight.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded: torch.Tensor | BlockWeight, shard_id: int = 0) -> None:
        self.method.load_weight(self, loaded, 0)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.method.embed(self, token_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [T, hidden_size]`` times the table: [T, vocab_size] (the tied LM head)."""
        return self.method.apply(self, hidden)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, weight applied in the input dtype (as Llama does).

    ``forward(x, residual)`` adds ``x`` into the residual stream in place first and returns ``(norm(sum), sum)``,
    the fused form the decoder layers chain (``kernels.rms_norm``)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.weight.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0) -> None:
        copy_checked(param.data, loaded, "weight")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return kernels.rms_norm(x, self.weight, self.eps)
        return kernels.rms_norm(x, self.weight, self.eps, residual), residual
