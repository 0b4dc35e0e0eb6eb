"""``radixserve sim`` (compare routing policies on a simulated cluster) and ``radixserve calibrate``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from typing import TYPE_CHECKING

from radixserve.cluster.base.config import POLICIES

if TYPE_CHECKING:
    from radixserve.cluster.control.sim.workload import Workload


def add_sim_commands(subparsers: argparse._SubParsersAction) -> None:
    sim = subparsers.add_parser(
        "sim", help="simulate a cluster on a trace and compare routing policies",
        description="Replay a workload through simulated workers (roofline cost model, the real radix cache) routed "
                    "by the router's own policies; prints a table, writes results.json and PNG plots to --out.")
    source = sim.add_mutually_exclusive_group()
    source.add_argument("--trace", type=Path, help="a Mooncake-format JSONL trace (512-token hash_ids)")
    source.add_argument("--workload", choices=("shared-prefix", "chat"), default="shared-prefix",
                        help="a generated workload when no --trace is given (default shared-prefix)")
    sim.add_argument("--time-scale", type=float, default=1.0,
                     help="multiply arrival and think times (0.5 = twice the load)")
    sim.add_argument("--tile", type=int, default=1, help="overlay this many copies with disjoint prefixes")
    sim.add_argument("--limit", type=int, help="only the trace's first N requests")
    sim.add_argument("--workers", type=int, nargs="+", default=[8], help="worker counts to simulate")
    sim.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    # Unset options keep SimConfig's defaults (named in the help), so parsing imports nothing of the simulator.
    sim.add_argument("--device", help="h100 (default) | h200 | a100 | cpu")
    sim.add_argument("--model", help="llama-3-8b (default) | llama-3-70b | smollm2-135m | mixtral-8x7b")
    sim.add_argument("--tp", dest="tensor_parallel", type=int, help="tensor-parallel ranks per worker")
    sim.add_argument("--num-blocks", type=int, help="KV pool per worker in blocks (default: from device memory)")
    sim.add_argument("--host-kv-gib", type=float, help="host-DRAM KV tier per worker in GiB (default 0: none)")
    sim.add_argument("--max-batch-tokens", type=int, help="tokens per engine step (default 8192)")
    sim.add_argument("--max-running", type=int, help="requests batched at once per worker (default 256)")
    sim.add_argument("--load-weight", type=float, help="the prefix policy's load weight (default: the router's)")
    sim.add_argument("--step-noise", type=float,
                     help="sigma of a log-normal factor on each step's time, per worker (default 0: exact steps)")
    sim.add_argument("--routers", dest="num_routers", type=_at_least_one,
                     help="router replicas taking the requests in turn, each with its own index and load (default 1)")
    sim.add_argument("--shared-load", dest="shared_load", type=_on_off,
                     help="on (default) | off: whether each router sees the in-flight load the others publish")
    sim.add_argument("--share-routes", dest="share_routes", type=_on_off,
                     help="on (default) | off: whether each router credits the routing decisions of the others")
    sim.add_argument("--seed", type=int, help="seeds the random policies and the step noise (default 0)")
    sim.add_argument("--out", type=Path, default=Path("sim-results"), help="folder for results.json and plots")
    sim.set_defaults(func=_run_sim)

    calibrate = subparsers.add_parser(
        "calibrate", help="measure this machine's CPU for the simulator's cpu preset",
        description="Time prefill and decode steps of the real engine with the default model on this CPU and fit the "
                    "simulator's 'cpu' device preset to them.")
    calibrate.add_argument("--out", type=Path, help="where to write the preset (default: the packaged cpu.json)")
    calibrate.set_defaults(func=_run_calibrate)


def _at_least_one(text: str) -> int:
    """An argparse type: an int >= 1 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _on_off(text: str) -> bool:
    """An argparse type: ``on`` or ``off``."""
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"must be on or off, got {text!r}")
    return text == "on"


def _load_workload(args: argparse.Namespace) -> Workload:
    from radixserve.cluster.control.sim import workload

    if args.trace is not None:
        loaded = workload.load_mooncake(args.trace, limit=args.limit)
    elif args.workload == "chat":
        loaded = workload.chat_sessions()
    else:
        loaded = workload.shared_prefix()
    if args.tile > 1:
        loaded = workload.tile(loaded, args.tile)
    return loaded.scaled(args.time_scale) if args.time_scale != 1.0 else loaded


def _run_sim(args: argparse.Namespace) -> int:
    from radixserve.cluster.control.sim import report
    from radixserve.cluster.control.sim.simulator import SimConfig, compare

    fields = {f.name for f in dataclasses.fields(SimConfig)} - {"num_workers", "policy"}
    try:
        loaded = _load_workload(args)
        base = SimConfig(**{name: getattr(args, name) for name in fields if getattr(args, name, None) is not None})
        configs = [dataclasses.replace(base, num_workers=n, policy=p) for n in args.workers for p in args.policies]
        stats = compare(loaded, configs)
    except (ValueError, OSError) as error:
        print(f"radixserve sim: error: {error}", file=sys.stderr)
        return 2
    print(report.format_table(stats))
    title = f"{loaded.name}: {len(loaded.requests):,} requests, {base.model} on {base.device}"
    if base.num_routers > 1:
        title += (f", {base.num_routers} routers (shared load {'on' if base.shared_load else 'off'}, "
                  f"shared routes {'on' if base.share_routes else 'off'})")
    meta = {"workload": loaded.name, "num_requests": len(loaded.requests), "time_scale": args.time_scale,
            "tile": args.tile, "config": dataclasses.asdict(base)}
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(args.out / "results.json", stats, meta)
    report.plot_scaling(stats, args.out / "scaling.png", title=title)
    for n in args.workers:
        report.plot_ttft_cdf([s for s in stats if s.num_workers == n], args.out / f"ttft_cdf_{n}.png",
                             title=f"{title}, {n} workers")
    print(f"wrote {args.out}/results.json and plots")
    return 0


def _run_calibrate(args: argparse.Namespace) -> int:
    from radixserve.cluster.control.sim import calibrate

    spec = calibrate.calibrate()
    path = args.out or calibrate.PRESET_PATH
    calibrate.save_preset(spec, path)
    print(f"{spec}\nwritten to {path}")
    return 0
