"""Shared-prefix serving through the cluster, every routing policy in one run.

The workload has the shape of SGLang's generated-shared-prefix benchmark, scaled to a 2-core CPU: ``groups``
system prompts of ``system_len`` tokens, each followed by ``prompts_per_group`` questions of ``question_len``
tokens, ``output_len`` generated tokens each (eos ignored), in a shuffled order with Poisson arrivals at
``rate`` requests/s. Prompts are random token ids (seeded), sent as ``token_ids`` so their lengths are exact.

For each run the bench starts a fresh cluster (``radixserve up --detach``, so client and router are separate
processes and every run starts cold), replays the same arrival schedule through the router, then measures
the router's own overhead: the TTFT of a short, cached request through the router minus the same request sent
straight to the worker the router chose, in pairs whose order alternates, medians of the paired differences.
Each policy runs ``--repeats`` times (default 2), all runs in one shuffled order (``--order-seed``), because
this machine's noise moves a run's throughput by 10-30%: the table gives each policy's medians and the spread
(lowest-highest) of its runs.

Reported per policy: prefix hit ratio (cached / prompt tokens, as the workers report them) and its share of the
oracle's (one unbounded cache that sees every request in arrival order), TTFT and end-to-end p50/p99,
throughput over the makespan, each worker's share of the requests, and the router overhead.

    python bench/bench_cluster.py                  # table on stdout, JSON in bench/results/cluster.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from radixserve.cluster.base.config import POLICIES
from radixserve.cluster.base.hashing import namespace_seed, page_hashes
from radixserve.cluster.base.model_store import ModelStore
from radixserve.v1 import api_pb2, api_pb2_grpc, types_pb2, worker_pb2, worker_pb2_grpc

RESULTS = Path(__file__).parent / "results"
PAGE_SIZE = 16
TOKEN_RANGE = (1000, 40000)  # ordinary vocabulary ids of SmolLM2, far from the special tokens


@dataclass(frozen=True)
class Workload:
    groups: int = 8
    prompts_per_group: int = 8
    system_len: int = 1024
    question_len: int = 64
    output_len: int = 32
    rate: float = 4.0
    seed: int = 0


@dataclass
class Arrival:
    at_s: float
    group: int
    token_ids: list[int]


@dataclass
class Outcome:
    worker_id: str = ""
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


@dataclass
class PolicyResult:
    policy: str
    hit_ratio: float
    oracle_share: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    e2e_p50_ms: float
    e2e_p99_ms: float
    requests_per_s: float
    output_tokens_per_s: float
    makespan_s: float
    worker_share: dict[str, float]
    router_overhead_p50_ms: float
    router_overhead_p99_ms: float
    errors: int
    outcomes: list[dict] = field(default_factory=list)


def make_arrivals(w: Workload) -> list[Arrival]:
    rng = random.Random(w.seed)
    systems = [[rng.randrange(*TOKEN_RANGE) for _ in range(w.system_len)] for _ in range(w.groups)]
    prompts = [(g, systems[g] + [rng.randrange(*TOKEN_RANGE) for _ in range(w.question_len)])
               for g in range(w.groups) for _ in range(w.prompts_per_group)]
    rng.shuffle(prompts)
    at, arrivals = 0.0, []
    for group, ids in prompts:
        arrivals.append(Arrival(at, group, ids))
        at += rng.expovariate(w.rate)
    return arrivals


def oracle_hit_ratio(arrivals: list[Arrival], namespace: str) -> float:
    """Cached / prompt tokens for one unbounded page-granular cache seeing the requests in arrival order."""
    seen: set[int] = set()
    cached = total = 0
    for arrival in arrivals:
        hashes = page_hashes(arrival.token_ids, PAGE_SIZE, namespace_seed(namespace))
        hits = next((i for i, h in enumerate(hashes) if h not in seen), len(hashes))
        cached += min(hits * PAGE_SIZE, len(arrival.token_ids) - 1)  # the last token is always computed
        total += len(arrival.token_ids)
        seen.update(hashes)
    return cached / total


# ---- the cluster --------------------------------------------------------------------------------------------

class Cluster:
    """``radixserve up --detach`` in a private RADIXSERVE_HOME, stopped by ``down``."""

    def __init__(self, policy: str, port: int, kv_memory_gib: float) -> None:
        self._home = tempfile.TemporaryDirectory(prefix="radixserve-bench-")
        models = Path(self._home.name) / "models"
        models.mkdir()
        model_dir = ModelStore().resolve("smollm2-135m-instruct").parent
        (models / model_dir.name).symlink_to(model_dir)
        self._env = {**os.environ, "RADIXSERVE_HOME": self._home.name}
        self.target = f"127.0.0.1:{port}"
        self._args = ["up", "--detach", "--port", str(port), "--policy", policy, "--kv-memory-gib",
                      str(kv_memory_gib), "--set", "engine.max_model_len=4096"]

    @property
    def targets_path(self) -> Path:
        """The Prometheus targets file ``up`` keeps for this cluster."""
        return Path(self._home.name) / "run" / "prometheus_targets.json"

    def _cli(self, *args: str) -> None:
        subprocess.run([sys.executable, "-m", "radixserve.cluster.control.cli", *args], env=self._env, check=True,
                       stdout=subprocess.DEVNULL, timeout=900)

    def __enter__(self) -> Cluster:
        self._cli(*self._args)
        return self

    def __exit__(self, *exc: object) -> None:
        self._cli("down")
        self._home.cleanup()


async def replay(target: str, arrivals: list[Arrival], output_len: int) -> tuple[list[Outcome], float]:
    """Send every arrival at its time; returns the outcomes and the makespan (first send to last finish)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = api_pb2_grpc.GenerationStub(channel)
        start = time.perf_counter()
        outcomes = await asyncio.gather(*(_send(stub, a, start, output_len) for a in arrivals))
        return list(outcomes), time.perf_counter() - start


async def _send(stub: api_pb2_grpc.GenerationStub, arrival: Arrival, start: float, output_len: int) -> Outcome:
    await asyncio.sleep(max(0.0, start + arrival.at_s - time.perf_counter()))
    request = api_pb2.GenerateRequest(token_ids=api_pb2.TokenIds(ids=arrival.token_ids), sampling=types_pb2.SamplingOptions(
        max_tokens=output_len, temperature=0.0, ignore_eos=True))
    outcome, sent = Outcome(), time.perf_counter()
    try:
        async for part in stub.Generate(request, timeout=1800):
            if not outcome.ttft_s and any(c.token_ids for c in part.choices):
                outcome.ttft_s = time.perf_counter() - sent
            outcome.worker_id = part.worker_id
            if part.HasField("usage"):
                outcome.prompt_tokens = part.usage.prompt_tokens
                outcome.cached_tokens = part.usage.cached_tokens
                outcome.completion_tokens = part.usage.completion_tokens
    except grpc.aio.AioRpcError as error:
        outcome.error = f"{error.code().name}: {error.details()}"
    outcome.e2e_s = time.perf_counter() - sent
    return outcome


async def router_overhead(target: str, num_pairs: int) -> list[float]:
    """Paired TTFT differences (router minus direct to the same worker) of a short cached request, seconds."""
    ids = list(range(TOKEN_RANGE[0], TOKEN_RANGE[0] + 2 * PAGE_SIZE + 1))
    sampling = types_pb2.SamplingOptions(max_tokens=1, temperature=0.0)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = api_pb2_grpc.GenerationStub(channel)
        first = await stub.Complete(api_pb2.GenerateRequest(token_ids=api_pb2.TokenIds(ids=ids), sampling=sampling))
        workers = await stub.ListWorkers(api_pb2.ListWorkersRequest())
        address = next(w.address for w in workers.workers if w.worker_id == first.worker_id)
        async with grpc.aio.insecure_channel(address) as direct_channel:
            direct = worker_pb2_grpc.WorkerStub(direct_channel)
            diffs = []
            for i in range(num_pairs):
                def routed() -> grpc.aio.UnaryStreamCall:
                    return stub.Generate(api_pb2.GenerateRequest(token_ids=api_pb2.TokenIds(ids=ids),
                                                                 sampling=sampling))

                def straight() -> grpc.aio.UnaryStreamCall:
                    return direct.Generate(worker_pb2.WorkerGenerateRequest(
                        request_id=f"bench-direct-{i}", token_ids=ids, sampling=sampling))

                if i % 2:  # alternate which goes first, so a drift in the machine's load cancels out
                    straight_s = await _ttft(straight())
                    routed_s = await _ttft(routed())
                else:
                    routed_s = await _ttft(routed())
                    straight_s = await _ttft(straight())
                diffs.append(routed_s - straight_s)
    return diffs


async def _ttft(call: grpc.aio.UnaryStreamCall) -> float:
    started = time.perf_counter()
    async for _ in call:
        return time.perf_counter() - started
    raise RuntimeError("the stream ended without a message")


# ---- the run ------------------------------------------------------------------------------------------------

def run_policy(policy: str, arrivals: list[Arrival], w: Workload, args: argparse.Namespace,
               oracle: float) -> PolicyResult:
    with Cluster(policy, args.port, args.kv_memory_gib) as cluster:
        outcomes, makespan = asyncio.run(replay(cluster.target, arrivals, w.output_len))
        overhead = asyncio.run(router_overhead(cluster.target, args.overhead_pairs))
    done = [o for o in outcomes if not o.error]
    hit_ratio = sum(o.cached_tokens for o in done) / max(1, sum(o.prompt_tokens for o in done))
    workers = sorted({o.worker_id for o in done})
    return PolicyResult(
        policy=policy, hit_ratio=hit_ratio, oracle_share=hit_ratio / oracle,
        ttft_p50_ms=_ms(_quantile([o.ttft_s for o in done], 0.5)), ttft_p99_ms=_ms(_quantile([o.ttft_s for o in done], 0.99)),
        e2e_p50_ms=_ms(_quantile([o.e2e_s for o in done], 0.5)), e2e_p99_ms=_ms(_quantile([o.e2e_s for o in done], 0.99)),
        requests_per_s=len(done) / makespan, output_tokens_per_s=sum(o.completion_tokens for o in done) / makespan,
        makespan_s=makespan, worker_share={wid: sum(o.worker_id == wid for o in done) / len(done) for wid in workers},
        router_overhead_p50_ms=_ms(_quantile(overhead, 0.5)), router_overhead_p99_ms=_ms(_quantile(overhead, 0.99)),
        errors=len(outcomes) - len(done), outcomes=[asdict(o) for o in outcomes])


def _cpu_model() -> str:
    """The CPU's model name (these benchmarks run on machines whose CPUs differ)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return "unknown"


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _ms(seconds: float) -> float:
    return seconds * 1000


SUMMARY_FIELDS = ("hit_ratio", "oracle_share", "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms",
                  "requests_per_s", "output_tokens_per_s", "router_overhead_p50_ms", "router_overhead_p99_ms")


def summarize(results: list[PolicyResult]) -> dict[str, dict[str, object]]:
    """Per policy, in first-run order: the median of each figure over its runs, the runs' lowest and highest,
    the larger worker share of each run, and the errors summed."""
    by_policy: dict[str, list[PolicyResult]] = {}
    for r in results:
        by_policy.setdefault(r.policy, []).append(r)
    summary: dict[str, dict[str, object]] = {}
    for policy, runs in by_policy.items():
        row: dict[str, object] = {"runs": len(runs), "errors": sum(r.errors for r in runs),
                                  "max_worker_share": [max(r.worker_share.values()) for r in runs]}
        for name in SUMMARY_FIELDS:
            values = [getattr(r, name) for r in runs]
            row[name] = statistics.median(values)
            row[name + "_range"] = [min(values), max(values)]
        summary[policy] = row
    return summary


def print_table(summary: dict[str, dict], oracle: float) -> None:
    print(f"\noracle hit ratio: {oracle:.3f}; medians over each policy's runs, (lowest-highest) beside\n")
    print("| policy | runs | hit ratio | of oracle | TTFT p50 | TTFT p99 | e2e p50 | e2e p99 | req/s "
          "| busier worker's share | router overhead p50 / p99 | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for policy, r in summary.items():
        def spread(name: str, fmt: str, scale: float = 1.0) -> str:
            low, high = r[name + "_range"]
            return f"{r[name] * scale:{fmt}} ({low * scale:{fmt}}-{high * scale:{fmt}})"
        shares = ", ".join(f"{v:.0%}" for v in r["max_worker_share"])
        print(f"| {policy} | {r['runs']} | {spread('hit_ratio', '.3f')} | {r['oracle_share']:.0%} | "
              f"{spread('ttft_p50_ms', ',.1f', 1e-3)} s | {spread('ttft_p99_ms', ',.1f', 1e-3)} s | "
              f"{r['e2e_p50_ms'] / 1000:,.1f} s | {r['e2e_p99_ms'] / 1000:,.1f} s | {spread('requests_per_s', '.3f')} | "
              f"{shares} | {r['router_overhead_p50_ms']:.2f} / {r['router_overhead_p99_ms']:.2f} ms | {r['errors']} |")
    _print_targets(summary)


def _print_targets(summary: dict[str, dict]) -> None:
    def check(ok: bool) -> str:
        return "met" if ok else "NOT met"

    prefix = summary.get("prefix")
    if prefix is None:
        return
    lines = [f"prefix hit ratio {prefix['oracle_share']:.0%} of oracle (>= 90%: {check(prefix['oracle_share'] >= 0.9)})",
             f"router overhead p50 {prefix['router_overhead_p50_ms']:.2f} ms (<= 2 ms: "
             f"{check(prefix['router_overhead_p50_ms'] <= 2)})"]
    if "round_robin" in summary:
        ratio = prefix["requests_per_s"] / summary["round_robin"]["requests_per_s"]
        lines.append(f"throughput {ratio:.2f}x round_robin (>= 1.5x: {check(ratio >= 1.5)})")
    if "sglang_cache_aware" in summary:
        peer = summary["sglang_cache_aware"]
        ratio = prefix["requests_per_s"] / peer["requests_per_s"]
        p99 = prefix["ttft_p99_ms"] / peer["ttft_p99_ms"]
        lines.append(f"throughput {ratio:.2f}x sglang_cache_aware (>= 1.0x: {check(ratio >= 1.0)}); TTFT p99 "
                     f"{p99:.2f}x sglang_cache_aware's (<= 1.0x: {check(p99 <= 1.0)})")
    print("\ntargets (medians): " + "; ".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in asdict(Workload()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each policy, all in one shuffled order")
    parser.add_argument("--order-seed", type=int, default=0)
    parser.add_argument("--kv-memory-gib", type=float, default=0.3,
                        help="KV cache per worker (0.3 GiB, 6.5k tokens, holds about 6 of the 8 groups' prompts)")
    parser.add_argument("--port", type=int, default=50071)
    parser.add_argument("--overhead-pairs", type=int, default=60)
    parser.add_argument("--out", type=Path, default=RESULTS / "cluster.json")
    args = parser.parse_args()
    workload = Workload(**{name: getattr(args, name) for name in asdict(Workload())})
    arrivals = make_arrivals(workload)
    oracle = oracle_hit_ratio(arrivals, "smollm2-135m-instruct")
    order = [policy for policy in args.policies for _ in range(args.repeats)]
    random.Random(args.order_seed).shuffle(order)
    results = []
    for i, policy in enumerate(order, start=1):
        print(f"run {i}/{len(order)}: {policy} ...", file=sys.stderr, flush=True)
        results.append(run_policy(policy, arrivals, workload, args, oracle))
    summary = summarize(results)
    print_table(summary, oracle)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"workload": asdict(workload), "kv_memory_gib": args.kv_memory_gib,
                                    "oracle_hit_ratio": oracle, "cpu": _cpu_model(), "order": order,
                                    "summary": summary, "results": [asdict(r) for r in results]}, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
