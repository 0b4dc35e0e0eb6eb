"""The committed stubs are what proto/codegen.py produces from the committed .proto sources."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CODEGEN = Path(__file__).resolve().parents[2] / "proto" / "codegen.py"


def _check(proto_root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(proto_root / "codegen.py"), "--check"], capture_output=True,
                          text=True, timeout=120)


def test_committed_stubs_are_fresh():
    result = _check(CODEGEN.parent)
    assert result.returncode == 0, result.stderr


def test_a_changed_proto_makes_the_check_fail(tmp_path: Path):
    copy = tmp_path / "proto"
    subprocess.run(["cp", "-r", str(CODEGEN.parent), str(copy)], check=True)
    api = copy / "radixserve" / "v1" / "api.proto"
    api.write_text(api.read_text().replace("message Usage {", "message Usage {\n  uint32 extra_field = 99;"))
    result = _check(copy)
    assert result.returncode == 1
    assert "stale: proto/radixserve/v1/api_pb2.py" in result.stderr
