"""Opening a checkpoint: the path's format picks the loader (GGUF file or Hugging Face directory)."""

from __future__ import annotations

from pathlib import Path

from radixserve.worker.models.checkpoint import Checkpoint
from radixserve.worker.models.gguf_loader import GGUFCheckpoint
from radixserve.worker.models.hf_loader import HFCheckpoint


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a ``.gguf`` file or a Hugging Face directory (one holding ``config.json``)."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return GGUFCheckpoint(path)
    if path.is_dir() and (path / "config.json").is_file():
        return HFCheckpoint(path)
    raise ValueError(f"model: {str(path)!r} is neither a .gguf file nor a directory with a config.json")
