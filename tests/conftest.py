"""Shared fixtures. Helper modules in tests/fixtures/ are importable by name (e.g. ``import tiny_checkpoints``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))

import tiny_checkpoints  # noqa: E402  (needs the path above)

from radixserve.cluster.base.config import DEFAULT_MODEL  # noqa: E402
from radixserve.cluster.base.model_store import ModelStore  # noqa: E402
from radixserve.worker.models.checkpoint import Checkpoint
from radixserve.worker.models.loading import open_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved by transformers (untied, 2 layers, ChatML tokenizer)."""
    return tiny_checkpoints.write_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny-hf"))


@pytest.fixture(scope="session")
def tiny_gguf_path(tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_hf_dir``'s weights and tokenizer as an F32 llama GGUF (pre-tokenizer "smollm")."""
    return tiny_checkpoints.write_tiny_gguf_checkpoint(tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf",
                                                       tiny_hf_dir)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct GGUF, pulled into the model store on first use (the set-up script pulls it)."""
    return ModelStore().pull(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_path: Path) -> Checkpoint:
    """``smollm2_path`` opened (metadata and tokenizer; weights are read on demand)."""
    return open_checkpoint(smollm2_path)
