"""The layering of ARCHITECTURE.md, enforced by import-linter with the contracts in pyproject.toml.

The project must keep them; the same contracts, pointed at a throwaway package that breaks one, must fail, so a
contract that can no longer fail (a renamed package, a typo in a module name) does not pass silently.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
# The packages of the real tree, mirrored in the throwaway one as ``fake.<same path>``.
# The modules that must stay free of transport frameworks (the forbidden contract names them).
_NEUTRAL_MODULES = ("router.core", "cluster.base.generation", "cluster.base.requests")
PACKAGES = ("cluster", "cluster/base", "cluster/control", "cluster/control/sim", "router", "worker", "worker/kv",
            "v1", "kserve/v2")


def _lint(config: Path, cwd: Path, pythonpath: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([str(LINT_IMPORTS), str(config), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def _fake_tree(root: Path, modules: dict[str, str]) -> None:
    """Packages ``fake.<PACKAGES>`` with ``modules`` (dotted path under ``fake`` -> source) in them; ``fake``
    itself is a namespace package, as ``radixserve`` is."""
    for package in PACKAGES:
        folder = root / "fake" / package
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__init__.py").touch()
    for dotted in _NEUTRAL_MODULES:
        (root / "fake" / Path(*dotted.split("."))).with_suffix(".py").touch()
    for dotted, source in modules.items():
        (root / "fake" / Path(*dotted.split("."))).with_suffix(".py").write_text(source)


def _our_contracts_for_fake(path: Path) -> Path:
    """pyproject.toml's import-linter section with ``radixserve`` renamed ``fake``, as its own config file."""
    text = (REPO / "pyproject.toml").read_text()
    section = tomllib.loads(text)["tool"]["importlinter"]
    assert section["contracts"], "no import-linter contracts in pyproject.toml"
    lines = ["[tool.importlinter]"]
    roots = [name.replace("radixserve.", "fake.") for name in section["root_packages"]]
    lines.append(f"root_packages = {roots!r}")
    lines.extend(f"{key} = {value!r}".replace("True", "true") for key, value in section.items()
                 if key not in ("root_packages", "contracts"))
    for contract in section["contracts"]:
        lines.append("[[tool.importlinter.contracts]]")
        for key, value in contract.items():
            if isinstance(value, list):
                value = [item.replace("radixserve.", "fake.") for item in value]
            lines.append(f"{key} = {value!r}".replace("True", "true"))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_project_keeps_its_layering_contracts() -> None:
    result = _lint(REPO / "pyproject.toml", REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("modules", "broken"), [
    pytest.param({"cluster.base.config": "import fake.router.policies\n", "router.policies": ""},
                 "Layers", id="base-imports-router"),
    pytest.param({"router.server": "from fake.worker import engine\n", "worker.engine": ""},
                 "Layers", id="router-imports-worker"),
    pytest.param({"worker.engine": "from fake.cluster.control import pool\n", "cluster.control.pool": ""},
                 "Layers", id="worker-imports-control-plane"),
    pytest.param({"worker.engine": "from fake.worker import metrics\n",
                  "worker.metrics": "from fake.worker import engine\n"},
                 "No import cycles", id="cycle-in-worker"),
    pytest.param({"router.core": "import grpc\n"}, "import no gRPC or HTTP", id="core-imports-grpc"),
    pytest.param({"cluster.base.generation": "from starlette.responses import Response\n"},
                 "import no gRPC or HTTP", id="contract-imports-starlette"),
])
def test_a_forbidden_import_breaks_a_contract(tmp_path: Path, modules: dict[str, str], broken: str) -> None:
    _fake_tree(tmp_path, modules)
    config = _our_contracts_for_fake(tmp_path / "contracts.toml")
    result = _lint(config, tmp_path, pythonpath=str(tmp_path))
    assert result.returncode != 0, result.stdout + result.stderr
    num_contracts = len(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"])
    assert f"Contracts: {num_contracts - 1} kept, 1 broken." in result.stdout, result.stdout
    assert broken in result.stdout.partition("Broken contracts")[2], result.stdout


def test_the_same_fake_tree_without_the_bad_import_keeps_every_contract(tmp_path: Path) -> None:
    _fake_tree(tmp_path, {"router.server": "from fake.cluster.base import config\n", "cluster.base.config": "",
                          "cluster.control.pool": "from fake.worker import engine\nfrom fake.router import server\n",
                          "worker.engine": "from fake.cluster.base import config\nimport fake.v1\n"})
    result = _lint(_our_contracts_for_fake(tmp_path / "contracts.toml"), tmp_path, pythonpath=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
