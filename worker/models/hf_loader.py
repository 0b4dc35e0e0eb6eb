"""Hugging Face Llama/Mistral checkpoint directories: config.json, *.safetensors, tokenizer.json."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tokenizers import Tokenizer as Backend

from radixserve.worker.models.checkpoint import Checkpoint
from radixserve.worker.models.config import ModelConfig, RopeScaling
from radixserve.cluster.base.tokenizer import Tokenizer

_MODEL_TYPES = ("llama", "mistral")
_ROPE_FIELDS = ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor",
                "beta_fast", "beta_slow", "attention_factor")


class HFCheckpoint(Checkpoint):
    """A directory saved by ``save_pretrained``; its name is the directory's name.

    Mistral's sliding window is not implemented, so a window caps ``max_position_embeddings`` (within it, full
    attention is exact).
    """

    def __init__(self, directory: str | Path) -> None:
        self._directory = Path(directory)
        self._files = sorted(self._directory.glob("*.safetensors"))
        if not self._files:
            raise ValueError(f"model: {str(self._directory)!r} holds no *.safetensors weights")
        raw = _read_json(self._directory / "config.json")
        generation = _read_json(self._directory / "generation_config.json", missing_ok=True)
        tokenizer = _tokenizer(self._directory, raw)
        super().__init__(self._directory.name, _model_config(raw, generation), tokenizer)

    def weights(self, blocks: bool = False) -> Iterator[tuple[str, torch.Tensor]]:  # no blocks in safetensors
        for file in self._files:
            with safe_open(file, framework="pt") as tensors:
                for name in tensors.keys():
                    if name.endswith("rotary_emb.inv_freq"):  # buffers some old checkpoints saved
                        continue
                    if name == "lm_head.weight" and self.config.tie_word_embeddings:
                        continue
                    yield name, tensors.get_tensor(name).to(torch.float32).contiguous()


def _read_json(path: Path, missing_ok: bool = False) -> dict[str, Any]:
    if missing_ok and not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"model: cannot read {path.name}: {error}") from error


def _require(raw: dict[str, Any], key: str) -> Any:
    if raw.get(key) is None:
        raise ValueError(f"{key}: missing from config.json")
    return raw[key]


def _ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _model_config(raw: dict[str, Any], generation: dict[str, Any]) -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"model_type: only {_MODEL_TYPES} checkpoints are supported, got {model_type!r}")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act: only 'silu' is supported, got {raw['hidden_act']!r}")
    hidden = _require(raw, "hidden_size")
    heads = _require(raw, "num_attention_heads")
    max_positions = _require(raw, "max_position_embeddings")
    if raw.get("sliding_window"):
        max_positions = min(max_positions, raw["sliding_window"])
    # transformers >= 5 writes rope_parameters (theta included); older files have rope_theta + rope_scaling.
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    return ModelConfig(
        vocab_size=_require(raw, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_require(raw, "intermediate_size"),
        num_hidden_layers=_require(raw, "num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or hidden // heads,
        max_position_embeddings=max_positions,
        rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
        rope_scaling=_rope_scaling(rope),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(_ids(raw.get("eos_token_id")) + _ids(generation.get("eos_token_id")))),
    )


def _rope_scaling(rope: dict[str, Any]) -> RopeScaling | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    return RopeScaling(kind, **{field: rope[field] for field in _ROPE_FIELDS if rope.get(field) is not None})


def _tokenizer(directory: Path, raw: dict[str, Any]) -> Tokenizer:
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"model: {str(directory)!r} has no tokenizer.json")
    backend = Backend.from_file(str(path))
    settings = _read_json(directory / "tokenizer_config.json", missing_ok=True)
    bos = _token_id(backend, settings.get("bos_token"), raw.get("bos_token_id"))
    eos = _token_id(backend, settings.get("eos_token"), (_ids(raw.get("eos_token_id")) or [None])[0])
    return Tokenizer(backend, bos_token_id=bos, eos_token_id=eos, chat_template=_chat_template(directory, settings))


def _token_id(backend: Backend, token: str | dict[str, Any] | None, fallback: int | None) -> int | None:
    """The id of a tokenizer_config token entry (a string, or an object with ``content``), else ``fallback``."""
    if isinstance(token, dict):
        token = token.get("content")
    token_id = backend.token_to_id(token) if token else None
    return fallback if token_id is None else token_id


def _chat_template(directory: Path, settings: dict[str, Any]) -> str | None:
    """``chat_template.jinja`` (newer transformers) or tokenizer_config's ``chat_template`` (a string, or a list of
    named templates of which we use ``default``)."""
    file = directory / "chat_template.jinja"
    if file.is_file():
        return file.read_text(encoding="utf-8")
    template = settings.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template
