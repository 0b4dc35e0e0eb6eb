"""Generate the Python stubs of every .proto under proto/: ``python proto/codegen.py [--check]``.

The stubs are committed next to their sources: ``proto/radixserve/v1/*_pb2*.py``, installed as the package
``radixserve.v1``, and the KServe v2 protocol's ``proto/radixserve/kserve/v2/*_pb2*.py`` (protobuf package
``inference``), installed as ``radixserve.kserve.v2``. ``--check`` regenerates into a scratch folder and exits 1, listing the stale files, when the
committed stubs differ from what the sources produce.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
_STUB_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_sources() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    """Write the stubs of every source into ``out_dir``, mirroring the source tree."""
    include = Path(protoc.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *(str(p.relative_to(PROTO_ROOT)) for p in proto_sources())]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


def stale_stubs() -> list[str]:
    """Committed stub files that differ from freshly generated ones (or are missing or orphaned)."""
    with tempfile.TemporaryDirectory() as scratch:
        fresh_root = Path(scratch)
        generate(fresh_root)
        fresh = {p.relative_to(fresh_root) for p in fresh_root.rglob("*") if p.name.endswith(_STUB_SUFFIXES)}
        committed = {p.relative_to(PROTO_ROOT) for p in PROTO_ROOT.rglob("*") if p.name.endswith(_STUB_SUFFIXES)}
        stale = [str(p) for p in sorted(fresh | committed)
                 if p not in fresh or p not in committed
                 or not filecmp.cmp(fresh_root / p, PROTO_ROOT / p, shallow=False)]
    return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the committed stubs are stale")
    args = parser.parse_args()
    if args.check:
        stale = stale_stubs()
        for path in stale:
            print(f"stale: proto/{path} (run: python proto/codegen.py)", file=sys.stderr)
        return 1 if stale else 0
    generate(PROTO_ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
