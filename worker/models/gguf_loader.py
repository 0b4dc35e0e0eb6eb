"""Llama-architecture GGUF files (llama.cpp's format): metadata, byte-level BPE tokenizer, weights (dequantized, or
the file's own Q8_0 / Q4_0 / Q4_1 blocks).

Two GGUF conventions are undone here: a tensor's ``shape`` lists its dimensions fastest-varying first (the
reverse of PyTorch's), and the rows of the Q and K projections are stored permuted for interleaved rotary pairs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from radixserve.worker.kernels.blocks import BLOCK_TYPES
from radixserve.worker.models.checkpoint import BlockWeight, Checkpoint
from radixserve.worker.models.config import ModelConfig, RopeScaling
from radixserve.cluster.base.tokenizer import Tokenizer

_ARCH = "llama"
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# The split pattern of Llama 3's tokenizer (llama.cpp's "llama-bpe"): case-insensitive contractions, letter runs
# with one leading non-letter, numbers in groups of up to three, punctuation runs, newlines, other whitespace.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_MISSING = object()


class GGUFCheckpoint(Checkpoint):
    """A llama-architecture GGUF file; its name is the file name without ``.gguf``."""

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        self._reader = gguf.GGUFReader(self._path)
        architecture = _meta(self._reader, "general.architecture")
        if architecture != _ARCH:
            raise ValueError(f"general.architecture: only {_ARCH!r} GGUF files are supported, got {architecture!r}")
        self._hf_names = {t.name: _hf_name(t.name) for t in self._reader.tensors}
        tokenizer = _tokenizer(self._reader)
        super().__init__(self._path.stem, _model_config(self._reader, tokenizer), tokenizer)

    @property
    def has_blocks(self) -> bool:
        return any(tensor.tensor_type.name in BLOCK_TYPES for tensor in self._reader.tensors)

    def weights(self, blocks: bool = False) -> Iterator[tuple[str, torch.Tensor | BlockWeight]]:
        for tensor in self._reader.tensors:
            name = self._hf_names[tensor.name]
            weight = _blocks(tensor) if blocks and tensor.tensor_type.name in BLOCK_TYPES else _dequantize(tensor)
            if ".q_proj." in name:
                weight = _unpermute_rotary_rows(weight, self.config.num_attention_heads)
            elif ".k_proj." in name:
                weight = _unpermute_rotary_rows(weight, self.config.num_key_value_heads)
            yield name, weight


def _meta(reader: gguf.GGUFReader, key: str, default: Any = _MISSING) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is _MISSING:
            raise ValueError(f"{key}: missing from the GGUF metadata")
        return default
    return field.contents()


def _hf_name(gguf_name: str) -> str:
    stem, _, kind = gguf_name.rpartition(".")
    layer = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if kind in ("weight", "bias"):
        if stem in _GLOBAL_TENSORS:
            return f"{_GLOBAL_TENSORS[stem]}.{kind}"
        if layer and layer[2] in _LAYER_TENSORS:
            return f"model.layers.{layer[1]}.{_LAYER_TENSORS[layer[2]]}.{kind}"
    raise ValueError(f"{gguf_name}: tensor not supported by the llama loader")


def _model_config(reader: gguf.GGUFReader, tokenizer: Tokenizer) -> ModelConfig:
    shapes = {t.name: _torch_shape(t) for t in reader.tensors}
    if "token_embd.weight" not in shapes:
        raise ValueError("token_embd.weight: missing from the GGUF tensors")
    hidden = _meta(reader, f"{_ARCH}.embedding_length")
    heads = _meta(reader, f"{_ARCH}.attention.head_count")
    head_dim = _meta(reader, f"{_ARCH}.attention.key_length", hidden // heads)
    rotary_dim = _meta(reader, f"{_ARCH}.rope.dimension_count", head_dim)
    if rotary_dim != head_dim:
        raise ValueError(f"{_ARCH}.rope.dimension_count: partial rotary ({rotary_dim} of {head_dim}) is not supported")
    eos_ids = [tokenizer.eos_token_id, _meta(reader, "tokenizer.ggml.eot_token_id", None)]
    return ModelConfig(
        vocab_size=shapes["token_embd.weight"][0],  # may exceed the tokenizer's (padded embedding)
        hidden_size=hidden,
        intermediate_size=_meta(reader, f"{_ARCH}.feed_forward_length"),
        num_hidden_layers=_meta(reader, f"{_ARCH}.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=_meta(reader, f"{_ARCH}.attention.head_count_kv", heads),
        head_dim=head_dim,
        max_position_embeddings=_meta(reader, f"{_ARCH}.context_length"),
        rope_theta=_float32(_meta(reader, f"{_ARCH}.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader),
        rms_norm_eps=_float32(_meta(reader, f"{_ARCH}.attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in shapes,
        attention_bias="blk.0.attn_q.bias" in shapes,
        mlp_bias="blk.0.ffn_gate.bias" in shapes,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=tuple(dict.fromkeys(i for i in eos_ids if i is not None)),
    )


def _rope_scaling(reader: gguf.GGUFReader) -> RopeScaling | None:
    key = f"{_ARCH}.rope.scaling"
    kind = _meta(reader, f"{key}.type", "none")
    if kind == "none":
        return None
    if kind not in ("linear", "yarn"):
        raise ValueError(f"{key}.type: unsupported RoPE scaling {kind!r} (supported: none, linear, yarn)")
    factor = _float32(_meta(reader, f"{key}.factor"))
    if kind == "linear":
        return RopeScaling(kind, factor=factor)
    betas = {"beta_fast": _meta(reader, f"{key}.yarn_beta_fast", None),
             "beta_slow": _meta(reader, f"{key}.yarn_beta_slow", None)}
    return RopeScaling(kind, factor=factor,
                       original_max_position_embeddings=_meta(reader, f"{key}.original_context_length"),
                       **{name: _float32(value) for name, value in betas.items() if value is not None})


def _float32(value: float) -> float:
    """The shortest decimal that a float32 metadata value stands for (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _tokenizer(reader: gguf.GGUFReader) -> Tokenizer:
    model = _meta(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"tokenizer.ggml.model: only byte-level BPE ('gpt2') is supported, got {model!r}")
    pre = _meta(reader, "tokenizer.ggml.pre")
    pre_tokenizer = _pre_tokenizer(pre)
    tokens: list[str] = _meta(reader, "tokenizer.ggml.tokens")
    try:
        backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                     merges=[_merge_pair(m) for m in _meta(reader, "tokenizer.ggml.merges")],
                                     ignore_merges=pre == "llama-bpe"))
    except Exception as error:  # tokenizers raises a bare Exception for merges that name unknown tokens
        raise ValueError(f"tokenizer.ggml.merges: {error}") from error
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    _add_special_tokens(backend, tokens, _meta(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    bos = _meta(reader, "tokenizer.ggml.bos_token_id", None)
    if bos is not None and _meta(reader, "tokenizer.ggml.add_bos_token", False):
        backend.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A",
                                                               special_tokens=[(tokens[bos], bos)])
    return Tokenizer(backend, bos_token_id=bos, eos_token_id=_meta(reader, "tokenizer.ggml.eos_token_id", None),
                     chat_template=_meta(reader, "tokenizer.chat_template", None))


def _merge_pair(merge: str) -> tuple[str, str]:
    left, sep, right = merge.partition(" ")
    if not (sep and left and right) or " " in right:
        raise ValueError(f"tokenizer.ggml.merges: {merge!r} is not two tokens separated by one space")
    return left, right


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre != "llama-bpe")
    if pre == "gpt2":
        return byte_level
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre == "llama-bpe":
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), byte_level])
    raise ValueError(f"tokenizer.ggml.pre: unsupported pre-tokenizer {pre!r} (supported: gpt2, smollm, llama-bpe)")


def _add_special_tokens(backend: Backend, tokens: list[str], token_types: list[int]) -> None:
    """Register control tokens as special and user-defined ones as added, so text containing them maps to one id."""
    if len(token_types) != len(tokens):
        raise ValueError(f"tokenizer.ggml.token_type: {len(token_types)} types for {len(tokens)} tokens")
    kinds = {gguf.TokenType.CONTROL: True, gguf.TokenType.USER_DEFINED: False}
    added = [AddedToken(token, special=kinds[kind], normalized=False)
             for token, kind in zip(tokens, token_types, strict=True) if kind in kinds]
    backend.add_tokens(added)


def _dequantize(tensor: gguf.ReaderTensor) -> torch.Tensor:
    try:
        values = gguf.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as error:
        raise ValueError(f"{tensor.name}: unsupported tensor type {tensor.tensor_type.name}") from error
    # F32 data is a view of the read-only memory map: copy it (and only it) into a writable array.
    return torch.from_numpy(np.require(values, np.float32, ["C", "W"]).reshape(_torch_shape(tensor)))


def _blocks(tensor: gguf.ReaderTensor) -> BlockWeight:
    rows, in_features = _torch_shape(tensor)
    data = torch.from_numpy(np.array(tensor.data, dtype=np.uint8).reshape(rows, -1))  # a copy: the map is read-only
    return BlockWeight(data, BLOCK_TYPES[tensor.tensor_type.name], in_features)


def _torch_shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists the fastest-varying dimension first


def _unpermute_rotary_rows(weight: torch.Tensor | BlockWeight, num_heads: int) -> torch.Tensor | BlockWeight:
    """Invert llama.cpp's Q/K row order: per head, rows stored as (pair, half) go back to (half, pair); a block
    weight's rows move whole."""
    if isinstance(weight, BlockWeight):
        return BlockWeight(_unpermute_rotary_rows(weight.data, num_heads), weight.block_type, weight.in_features)
    rows = weight.shape[0]
    pairs = rows // num_heads // 2
    return weight.reshape(num_heads, pairs, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape).contiguous()
