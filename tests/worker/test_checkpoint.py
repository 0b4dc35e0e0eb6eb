from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import tiny_checkpoints
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve.worker.models.checkpoint import Checkpoint
from radixserve.worker.models.loading import open_checkpoint
from radixserve.worker.models.config import RopeScaling
from radixserve.worker.models.gguf_loader import GGUFCheckpoint
from radixserve.worker.models.hf_loader import HFCheckpoint

TEXTS = ["", "Hello, world!", "  two  spaces\n\nand newlines\t", "12345 + 678 = 13023", "Grüße 🙂🚀 日本語",
         "<|im_start|>user\nHi<|im_end|>\n", "unknown-ish <|im_start tokens|>"]


def expected_names(num_layers: int, tied: bool, bias: bool = False) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"} | (set() if tied else {"lm_head.weight"})
    for i in range(num_layers):
        layer = f"model.layers.{i}."
        names |= {layer + "input_layernorm.weight", layer + "post_attention_layernorm.weight"}
        names |= {f"{layer}mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
        names |= {f"{layer}self_attn.{p}_proj.{kind}" for p in "qkvo" for kind in ("weight", "bias") if
                  kind == "weight" or bias}
    return names


def assert_same_weights(actual: Checkpoint, expected: dict[str, torch.Tensor]) -> None:
    weights = dict(actual.weights())
    assert weights.keys() == expected.keys()
    for name, tensor in weights.items():
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu" and tensor.is_contiguous(), name
        assert torch.equal(tensor, expected[name]), name


@pytest.fixture(scope="module")
def hf(tiny_hf_dir: Path) -> Checkpoint:
    return open_checkpoint(tiny_hf_dir)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_gguf_path: Path) -> Checkpoint:
    return open_checkpoint(tiny_gguf_path)


def test_open_checkpoint_dispatches(hf: Checkpoint, tiny_gguf: Checkpoint, tiny_gguf_path: Path) -> None:
    assert isinstance(hf, HFCheckpoint) and isinstance(tiny_gguf, GGUFCheckpoint)
    assert tiny_gguf.name == tiny_gguf_path.stem


def test_open_checkpoint_rejects_other_paths(tmp_path: Path) -> None:
    other_file = tmp_path / "weights.bin"
    other_file.write_bytes(b"")
    for path in (tmp_path / "missing.gguf", tmp_path, other_file):  # missing, directory without config.json
        with pytest.raises(ValueError, match="model"):
            open_checkpoint(path)


def test_hf_weights_equal_transformers_state_dict(hf: Checkpoint, tiny_hf_dir: Path) -> None:
    from transformers import LlamaForCausalLM

    state = LlamaForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).state_dict()
    assert_same_weights(hf, {name: tensor.contiguous() for name, tensor in state.items()})
    assert {name for name, _ in hf.weights()} == expected_names(2, tied=False)


def test_hf_config(hf: Checkpoint) -> None:
    c = hf.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (320, 64, 128, 2)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.max_position_embeddings) == (4, 2, 16, 256)
    assert (c.rope_theta, c.rope_scaling, c.rms_norm_eps, c.tie_word_embeddings) == (10000.0, None, 1e-5, False)
    assert (c.bos_token_id, c.eos_token_ids) == (1, (2,))


def test_gguf_matches_hf_exactly(hf: Checkpoint, tiny_gguf: Checkpoint, tiny_hf_dir: Path) -> None:
    assert tiny_gguf.config == hf.config
    assert_same_weights(tiny_gguf, dict(hf.weights()))  # equal Q/K rows: llama.cpp's permutation is undone


VARIANTS = {
    "tied": {"tie_word_embeddings": True},
    "head_dim_32": {"head_dim": 32},  # head_dim != hidden / heads: GGUF's attention.key_length
    "attention_bias": {"attention_bias": True},  # the Q/K biases are permuted too
    "linear_rope": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "yarn_rope": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
    "three_layers_gpt2_pre": {"num_hidden_layers": 3, "digits": False},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_gguf_matches_hf_variants(tmp_path: Path, variant: str) -> None:
    options = VARIANTS[variant]
    hf_dir = tiny_checkpoints.write_tiny_hf_checkpoint(tmp_path / "hf", seed=1, **options)
    pre = "smollm" if options.get("digits", True) else "gpt2"
    gguf_path = tiny_checkpoints.write_tiny_gguf_checkpoint(tmp_path / "tiny.gguf", hf_dir, pre=pre)
    hf, converted = open_checkpoint(hf_dir), open_checkpoint(gguf_path)
    assert converted.config == hf.config
    assert_same_weights(hf, tiny_checkpoints.hf_state_dict(hf_dir))
    assert_same_weights(converted, tiny_checkpoints.hf_state_dict(hf_dir))
    assert [converted.tokenizer.encode(t) for t in TEXTS] == [hf.tokenizer.encode(t) for t in TEXTS]
    tied = options.get("tie_word_embeddings", False)
    assert {name for name, _ in hf.weights()} == expected_names(options.get("num_hidden_layers", 2), tied,
                                                                options.get("attention_bias", False))
    assert hf.config.tie_word_embeddings == tied


def test_gguf_rope_scaling_fields(tmp_path: Path) -> None:
    hf_dir = tiny_checkpoints.write_tiny_hf_checkpoint(tmp_path / "hf", **VARIANTS["yarn_rope"])
    converted = open_checkpoint(tiny_checkpoints.write_tiny_gguf_checkpoint(tmp_path / "t.gguf", hf_dir))
    assert converted.config.rope_scaling == RopeScaling("yarn", factor=4.0, original_max_position_embeddings=64)


def test_gguf_q8_0_dequantizes(tmp_path: Path, tiny_hf_dir: Path) -> None:
    quantized = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    path = tiny_checkpoints.write_tiny_gguf_checkpoint(tmp_path / "q8.gguf", tiny_hf_dir, q8_0=quantized)
    reference = tiny_checkpoints.hf_state_dict(tiny_hf_dir)
    weights = dict(open_checkpoint(path).weights())
    for name in quantized:
        original = reference[name].numpy()
        # Q8_0 blocks run along rows, so quantizing commutes with the row permutation.
        round_trip = gguf.dequantize(gguf.quantize(original, gguf.GGMLQuantizationType.Q8_0),
                                     gguf.GGMLQuantizationType.Q8_0)
        assert torch.equal(weights[name], torch.from_numpy(round_trip.reshape(original.shape))), name
        assert torch.allclose(weights[name], reference[name], atol=float(np.abs(original).max()) / 127), name
    assert torch.equal(weights["model.norm.weight"], reference["model.norm.weight"])


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60))
def test_gguf_tokenizer_matches_hf_tokenizer(hf: Checkpoint, tiny_gguf: Checkpoint, text: str) -> None:
    ids = hf.tokenizer.encode(text)
    assert tiny_gguf.tokenizer.encode(text) == ids
    assert tiny_gguf.tokenizer.encode(text, add_special_tokens=True) == hf.tokenizer.encode(text, True)
    for skip in (True, False):
        assert tiny_gguf.tokenizer.decode(ids, skip) == hf.tokenizer.decode(ids, skip)


def test_gguf_tokenizer_metadata(hf: Checkpoint, tiny_gguf: Checkpoint) -> None:
    for attribute in ("vocab_size", "bos_token_id", "eos_token_id", "all_special_ids", "chat_template"):
        assert getattr(tiny_gguf.tokenizer, attribute) == getattr(hf.tokenizer, attribute), attribute
    assert [tiny_gguf.tokenizer.encode(t) for t in TEXTS] == [hf.tokenizer.encode(t) for t in TEXTS]
    chat = [{"role": "user", "content": "Hi"}]
    assert tiny_gguf.tokenizer.apply_chat_template(chat) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_llama_bpe_pre_tokenizer_splits_numbers_in_threes(tmp_path: Path, tiny_hf_dir: Path) -> None:
    path = tiny_checkpoints.write_tiny_gguf_checkpoint(tmp_path / "l3.gguf", tiny_hf_dir, pre="llama-bpe")
    backend = open_checkpoint(path).tokenizer._backend  # the pre-tokenizer is not part of the public API
    pieces = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str("12345 I'VE tokens!!\n\n")]
    assert pieces == ["123", "45", "ĠI", "'VE", "Ġtokens", "!!ĊĊ"]


def write_metadata_gguf(path: Path, architecture: str, tensors: tuple[str, ...] = (), **strings: str) -> Path:
    writer = gguf.GGUFWriter(str(path), architecture)
    for key, value in strings.items():
        writer.add_string(key.replace("__", "."), value)
    for name in tensors:
        writer.add_tensor(name, np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(("architecture", "tensors", "strings", "field"), [
    ("gpt2", (), {}, "general.architecture"),
    ("llama", ("rope_freqs.weight",), {}, "rope_freqs.weight"),
    ("llama", (), {"tokenizer__ggml__model": "llama"}, "tokenizer.ggml.model"),
    ("llama", (), {"tokenizer__ggml__model": "gpt2", "tokenizer__ggml__pre": "qwen2"}, "tokenizer.ggml.pre"),
    ("llama", (), {"tokenizer__ggml__model": "gpt2"}, "tokenizer.ggml.pre"),
])
def test_gguf_rejects_unsupported_files(tmp_path: Path, architecture: str, tensors: tuple[str, ...],
                                        strings: dict[str, str], field: str) -> None:
    path = write_metadata_gguf(tmp_path / "bad.gguf", architecture, tensors, **strings)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        open_checkpoint(path)


def edited_hf_copy(tiny_hf_dir: Path, destination: Path, **changes: Any) -> Path:
    """A copy of the tiny HF checkpoint whose config.json has ``changes`` (None deletes a key)."""
    shutil.copytree(tiny_hf_dir, destination)
    raw = json.loads((destination / "config.json").read_text())
    raw.update(changes)
    (destination / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))
    return destination


def test_hf_legacy_rope_fields_and_eos_lists(tiny_hf_dir: Path, tmp_path: Path) -> None:
    directory = edited_hf_copy(tiny_hf_dir, tmp_path / "legacy", rope_parameters=None, rope_theta=500000.0,
                               rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                               eos_token_id=[2, 0])
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    config = open_checkpoint(directory).config
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == RopeScaling("llama3", factor=8.0, original_max_position_embeddings=64)
    assert config.eos_token_ids == (2, 0, 1)


def test_hf_sliding_window_caps_context(tiny_hf_dir: Path, tmp_path: Path) -> None:
    directory = edited_hf_copy(tiny_hf_dir, tmp_path / "mistral", model_type="mistral", sliding_window=128)
    assert open_checkpoint(directory).config.max_position_embeddings == 128


@pytest.mark.parametrize(("changes", "field"), [
    ({"model_type": "gpt2"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"hidden_size": None}, "hidden_size"),
    ({"rope_parameters": {"rope_type": "longrope", "factor": 2.0}}, "rope_scaling.kind"),
])
def test_hf_rejects_unsupported_configs(tiny_hf_dir: Path, tmp_path: Path, changes: dict[str, Any],
                                        field: str) -> None:
    with pytest.raises(ValueError, match=field):
        open_checkpoint(edited_hf_copy(tiny_hf_dir, tmp_path / "bad", **changes))


def test_hf_requires_weights_and_tokenizer(tiny_hf_dir: Path, tmp_path: Path) -> None:
    no_weights = edited_hf_copy(tiny_hf_dir, tmp_path / "no-weights")
    (no_weights / "model.safetensors").unlink()
    no_tokenizer = edited_hf_copy(tiny_hf_dir, tmp_path / "no-tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    for directory, message in ((no_weights, "safetensors"), (no_tokenizer, "tokenizer.json")):
        with pytest.raises(ValueError, match=f"model.*{message}"):
            open_checkpoint(directory)


def test_hf_chat_template_file_wins(tiny_hf_dir: Path, tmp_path: Path) -> None:
    directory = edited_hf_copy(tiny_hf_dir, tmp_path / "jinja")
    (directory / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    tokenizer = open_checkpoint(directory).tokenizer
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>x"


@pytest.fixture(scope="module")
def smollm2(smollm2_checkpoint: Checkpoint) -> Checkpoint:
    return smollm2_checkpoint


def test_smollm2_config(smollm2: Checkpoint) -> None:
    c = smollm2.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert (c.head_dim, c.intermediate_size, c.vocab_size, c.max_position_embeddings) == (64, 1536, 49152, 8192)
    assert (c.rope_theta, c.rms_norm_eps, c.tie_word_embeddings, c.rope_scaling) == (100000.0, 1e-5, True, None)
    assert (c.bos_token_id, c.eos_token_ids, smollm2.name) == (1, (2,), "SmolLM2-135M-Instruct.Q4_1")


def test_smollm2_weights_predict_capitals(smollm2: Checkpoint) -> None:
    """In a reference transformers Llama the weights name capitals: names, shapes and Q/K row order are right."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = smollm2.config
    weights = dict(smollm2.weights())
    assert weights.keys() == expected_names(30, tied=True)
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (3 * 64, 576)
    config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rope_theta=c.rope_theta,
        rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=True)
    with torch.device("meta"):  # skip the random init of 135M parameters
        reference = LlamaForCausalLM(config)
    reference.load_state_dict(weights, strict=False, assign=True)
    reference.lm_head.weight = reference.model.embed_tokens.weight
    reference.model.rotary_emb = type(reference.model.rotary_emb)(config=config)  # its buffers were on meta
    tokenizer = smollm2.tokenizer
    first, second = tokenizer.encode("The capital of France is"), tokenizer.encode(" Paris. The capital of Germany is")
    with torch.no_grad():
        predicted = reference(torch.tensor([first + second])).logits[0].argmax(-1)
    assert tokenizer.decode([int(predicted[len(first) - 1])]) == " Paris"
    assert tokenizer.decode([int(predicted[-1])]) == " Berlin"
