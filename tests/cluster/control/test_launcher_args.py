"""``radixserve up``'s flags become one ``ClusterConfig``: ``--routers N`` puts the cluster on Redis, replica
ports listed with it are checked against N, and a bus backend the user set is kept."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from radixserve.cluster.control.launcher import add_launcher_commands, config_from_args


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_launcher_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(["up", *argv])


def test_routers_above_one_put_the_cluster_on_redis_with_their_listed_ports() -> None:
    config = config_from_args(parse("--routers", "4", "--set", "router.replica_ports=[5001, 5002, 5003, 5004]"))
    assert (config.router.replicas, config.bus.backend) == (4, "redis")
    assert config.router.replica_ports == (5001, 5002, 5003, 5004)


def test_one_router_stays_in_process_and_a_configured_backend_is_kept(tmp_path: Path) -> None:
    assert config_from_args(parse("--routers", "1")).bus.backend == "inprocess"
    toml = tmp_path / "cluster.toml"
    toml.write_text('[bus]\nbackend = "redis"\nurl = "redis://10.0.0.7:6379/0"\n')
    config = config_from_args(parse("--config", str(toml), "--routers", "2"))
    assert (config.bus.backend, config.bus.url) == ("redis", "redis://10.0.0.7:6379/0")


def test_replica_ports_that_do_not_match_the_routers_are_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"^router\.replica_ports: must list one port per replica \(2\)"):
        config_from_args(parse("--routers", "2", "--set", "router.replica_ports=[5001]"))
    with pytest.raises(ValueError, match=r"^bus\.backend: must be \"redis\""):
        config_from_args(parse("--routers", "2", "--set", "bus.backend=\"inprocess\""))


def test_a_bare_word_set_pair_reaches_the_engine_config() -> None:
    assert config_from_args(parse("--set", "engine.kv_cache_dtype=int8")).engine.kv_cache_dtype == "int8"
    with pytest.raises(ValueError, match=r"^engine\.kv_cache_dtype: must be one of"):
        config_from_args(parse("--set", "engine.kv_cache_dtype=fp8"))
