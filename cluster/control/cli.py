"""The ``radixserve`` command line.

``up``/``down`` run the cluster (``cluster/control/launcher.py``), ``generate``/``status`` talk to its router
(``cluster/control/client.py``), ``top`` reads its /metrics endpoints (``cluster/control/top.py``), ``model pull|list`` manage
the model cache, ``sim``/``calibrate`` run the cluster simulator (``cluster/control/sim/``). Heavy modules (Ray, torch)
are imported inside the commands that need them, so ``radixserve status`` starts fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from radixserve.cluster.control.client import add_client_commands
from radixserve.cluster.control.launcher import add_launcher_commands
from radixserve.cluster.base.model_store import add_model_commands
from radixserve.cluster.control.sim.cli import add_sim_commands
from radixserve.cluster.control.top import add_top_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radixserve", description="LLM serving cluster with prefix-aware routing")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_launcher_commands(subparsers)
    add_client_commands(subparsers)
    add_model_commands(subparsers)
    add_sim_commands(subparsers)
    add_top_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
