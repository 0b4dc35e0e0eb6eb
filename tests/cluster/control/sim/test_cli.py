from __future__ import annotations

import json
from pathlib import Path

import pytest

from radixserve.cluster.control.cli import main


def test_sim_prints_a_table_and_writes_results_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["sim", "--workload", "shared-prefix", "--workers", "2", "3", "--policies", "prefix", "round_robin",
                 "--out", str(tmp_path)])
    assert code == 0
    table = capsys.readouterr().out
    assert "| prefix " in table and "| round_robin " in table
    results = json.loads((tmp_path / "results.json").read_text())
    assert [(r["num_workers"], r["policy"]) for r in results["results"]] == [
        (2, "prefix"), (2, "round_robin"), (3, "prefix"), (3, "round_robin")]
    assert results["meta"]["num_requests"] == 64
    for name in ("scaling.png", "ttft_cdf_2.png", "ttft_cdf_3.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")


def test_sim_reads_a_mooncake_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "trace.jsonl"
    lines = [{"timestamp": 0, "input_length": 1000, "output_length": 8, "hash_ids": [0, 1]},
             {"timestamp": 500, "input_length": 1500, "output_length": 8, "hash_ids": [0, 1, 2]}]
    trace.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert main(["sim", "--trace", str(trace), "--workers", "1", "--policies", "prefix", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())["results"][0]
    assert result["hit_ratio"] == pytest.approx(512 / 2500)  # the first request cached its one full block


@pytest.mark.parametrize("args, field", [(["--device", "tpu"], "device"), (["--time-scale", "0"], "time_scale"),
                                         (["--trace", "/nonexistent.jsonl"], "nonexistent")])
def test_sim_reports_bad_settings_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                          field: str) -> None:
    assert main(["sim", *args, "--out", str(tmp_path)]) == 2
    assert field in capsys.readouterr().err


def test_sim_runs_several_routers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "--workers", "2", "--policies", "prefix", "--routers", "3", "--shared-load", "off",
                 "--out", str(tmp_path)]) == 0
    config = json.loads((tmp_path / "results.json").read_text())["meta"]["config"]
    assert (config["num_routers"], config["shared_load"]) == (3, False)


@pytest.mark.parametrize("args, flag", [(["--routers", "0"], "--routers"), (["--routers", "two"], "--routers"),
                                        (["--shared-load", "yes"], "--shared-load")])
def test_sim_rejects_bad_router_settings_naming_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         args: list[str], flag: str) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["sim", *args, "--out", str(tmp_path)])
    assert exited.value.code == 2
    assert f"argument {flag}: must be" in capsys.readouterr().err
