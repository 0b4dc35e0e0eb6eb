"""A benchmark client someone else wrote against our router's OpenAI endpoint: NVIDIA's aiperf.

Starts a fresh 2-worker cluster as ``bench_cluster.py`` does (``radixserve up --detach``, router policy
``--policy``, default ``prefix``), writes the model's tokenizer as a Hugging Face tokenizer directory for aiperf
(it sizes its synthetic prompts with it), and runs ``aiperf profile`` from ``bench/.venv-peers`` (installed by
``bench/peers/setup.sh``) against the router's ``/v1/completions``, streamed, with the cluster benchmark's workload
shape in aiperf's own generator: ``groups`` shared prefixes of ``system_len`` tokens (``--num-prefix-prompts``,
``--prefix-prompt-length``), a ``question_len``-token prompt after one of them, ``output_len`` tokens generated
with eos ignored, ``groups x prompts_per_group`` requests at ``rate`` requests/s with Poisson arrivals. aiperf's
prompts are its own text (a Shakespeare corpus), so the prompts differ from bench_cluster's; the shape is the same.

aiperf's JSON report is saved as ``bench/results/client_aiperf.json``; the table gives its headline figures and
the prefix hit ratio the workers counted (``radixserve_worker_prefix_cache_*`` counters).

    python bench/bench_client.py                   # about 2 minutes
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench_cluster import (MODEL, PEERS_VENV, RESULTS, Cluster, Workload, add_workload_args, load_tokenizer,
                           workload_from_args)

from radixserve.cluster.base.config import POLICIES
from radixserve.cluster.base.metrics import scrape, total
from radixserve.cluster.base.tokenizer import Tokenizer
from radixserve.cluster.control.discovery import read_targets

_AIPERF_TIMEOUT_S = 1800
_HEADLINES = ("request_throughput", "time_to_first_token", "request_latency", "inter_token_latency",
              "output_token_throughput")


def write_hf_tokenizer(tokenizer: Tokenizer, directory: Path) -> Path:
    """``tokenizer`` as a Hugging Face tokenizer directory (``tokenizer.json`` and ``tokenizer_config.json``)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(tokenizer.to_json())
    special = {name: tokenizer.decode([token_id], skip_special_tokens=False)
               for name, token_id in (("bos_token", tokenizer.bos_token_id), ("eos_token", tokenizer.eos_token_id))
               if token_id is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": tokenizer.chat_template, **special}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def aiperf_command(url: str, tokenizer_dir: Path, w: Workload, artifact_dir: Path) -> list[str]:
    """``aiperf profile`` with the cluster benchmark's workload shape against the OpenAI server at ``url``."""
    return [str(PEERS_VENV / "bin" / "aiperf"), "profile", "--model", MODEL, "--url", url,
            "--endpoint-type", "completions", "--streaming", "--tokenizer", str(tokenizer_dir),
            "--num-prefix-prompts", str(w.groups), "--prefix-prompt-length", str(w.system_len),
            "--isl", str(w.question_len), "--isl-stddev", "0", "--osl", str(w.output_len), "--osl-stddev", "0",
            "--extra-inputs", "ignore_eos:true", "--request-rate", str(w.rate), "--arrival-pattern", "poisson",
            "--request-count", str(w.groups * w.prompts_per_group), "--random-seed", str(w.seed),
            "--output-artifact-dir", str(artifact_dir), "--ui", "none"]


def workers_hit_ratio(metrics_addresses: list[str]) -> float:
    """Cached / looked-up prompt tokens, summed over the workers' own counters."""
    samples = [s for address in metrics_addresses for s in scrape(address)]
    looked_up = total(samples, "radixserve_worker_prefix_cache_query_tokens_total")
    return total(samples, "radixserve_worker_prefix_cache_hit_tokens_total") / max(1.0, looked_up)


def print_report(report: dict, hit_ratio: float) -> None:
    """aiperf's headline figures (its ``avg``/``p50``/``p99`` of each) and the workers' hit ratio."""
    print("| figure | unit | avg | p50 | p99 |\n|---|---|---|---|---|")
    for name in _HEADLINES:
        figure = report.get(name) or {}
        cells = " | ".join(f"{figure[k]:,.2f}" if isinstance(figure.get(k), (int, float)) else "-"
                           for k in ("avg", "p50", "p99"))
        print(f"| {name} | {figure.get('unit', '')} | {cells} |")
    print(f"\nprefix hit ratio counted by the workers: {hit_ratio:.3f}; "
          f"errors: {json.dumps(report.get('error_summary') or [])}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(parser)
    parser.add_argument("--policy", default="prefix", choices=POLICIES)
    parser.add_argument("--kv-memory-gib", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=RESULTS / "client_aiperf.json")
    args = parser.parse_args()
    if not (PEERS_VENV / "bin" / "aiperf").exists():
        raise SystemExit(f"{PEERS_VENV} has no aiperf: run `bash bench/peers/setup.sh` first")
    workload = workload_from_args(args)
    with Cluster(args.policy, args.kv_memory_gib) as cluster:
        tokenizer_dir = write_hf_tokenizer(load_tokenizer(), cluster.home / "tokenizer")
        artifacts = cluster.home / "aiperf"
        command = aiperf_command(cluster.http_url, tokenizer_dir, workload, artifacts)
        with open(cluster.home / "aiperf.log", "w") as log:
            run = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 timeout=_AIPERF_TIMEOUT_S, check=False)
        if run.returncode != 0:
            print((cluster.home / "aiperf.log").read_text()[-4000:], file=sys.stderr)
            raise SystemExit(f"aiperf exited with status {run.returncode}")
        report = json.loads((artifacts / "profile_export_aiperf.json").read_text())
        hit_ratio = workers_hit_ratio(read_targets(cluster.targets_path)["worker"])
    print_report(report, hit_ratio)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"policy": args.policy, "command": command[1:], "workers_hit_ratio": hit_ratio,
                                    "aiperf": report}, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
