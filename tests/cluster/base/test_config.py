"""Cluster configuration: embedded defaults, TOML file, dotted overrides, errors naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from radixserve.cluster.base.config import ClusterConfig, EngineConfig, load_cluster_config, with_overrides


def test_defaults_are_two_workers_prefix_routing_and_the_default_model():
    config = load_cluster_config()
    assert config == ClusterConfig()
    assert config.pool.num_workers == 2 and config.router.policy == "prefix"
    assert config.engine.model == "smollm2-135m-instruct"


def test_toml_then_overrides(tmp_path: Path):
    path = tmp_path / "cluster.toml"
    path.write_text('[pool]\nnum_workers = 3\n[engine.cache]\nmemory_gib = 2\n[router]\npolicy = "random"\n')
    config = load_cluster_config(path, {"router.policy": "least_load", "engine.max_model_len": 1024})
    assert config.pool.num_workers == 3
    assert config.engine.cache.memory_gib == 2.0 and isinstance(config.engine.cache.memory_gib, float)
    assert config.router.policy == "least_load" and config.engine.max_model_len == 1024
    assert config.engine.cache.page_size == 16  # untouched defaults survive


@pytest.mark.parametrize("toml, field", [
    ("[pool]\nnum_workerz = 3\n", "pool.num_workerz"),
    ("[engine.cache]\npage_size = \"16\"\n", "engine.cache.page_size"),
    ("[router]\npolicy = \"fastest\"\n", "router.policy"),
    ("[engine]\nkv_cache_dtype = \"fp8\"\n", "engine.kv_cache_dtype"),
    ("[pool]\nnum_workers = 0\n", "pool.num_workers"),
    ("[pool]\nworker_session_port = 70000\n", "pool.worker_session_port"),
    ("router = 3\n", "router"),
    ("[pool\n", "config"),
])
def test_bad_toml_names_the_setting(tmp_path: Path, toml: str, field: str):
    path = tmp_path / "cluster.toml"
    path.write_text(toml)
    with pytest.raises(ValueError) as caught:
        load_cluster_config(path)
    assert str(caught.value).startswith(field)


def test_overrides_reject_unknown_keys_and_bad_types():
    with pytest.raises(ValueError, match=r"^router\.nope: unknown setting"):
        with_overrides(ClusterConfig(), {"router.nope": 1})
    with pytest.raises(ValueError, match=r"^engine: unknown setting"):
        with_overrides(ClusterConfig(), {"engine": 1})
    with pytest.raises(ValueError, match=r"^pool\.ray_address: must be str or null"):
        with_overrides(ClusterConfig(), {"pool.ray_address": 5})


def test_a_missing_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ValueError, match="^config: cannot read"):
        load_cluster_config(tmp_path / "missing.toml")


def test_a_nested_value_error_carries_the_dotted_path(tmp_path: Path):
    path = tmp_path / "cluster.toml"
    path.write_text("[engine.cache]\npage_size = 0\n")
    with pytest.raises(ValueError, match=r"^engine\.cache\.page_size: must be >= 1"):
        load_cluster_config(path)


def test_kv_cache_dtype_defaults_to_auto_and_int8_is_set_like_any_setting():
    assert ClusterConfig().engine.kv_cache_dtype == "auto"
    assert with_overrides(ClusterConfig(), {"engine.kv_cache_dtype": "int8"}).engine.kv_cache_dtype == "int8"
    with pytest.raises(ValueError, match=r"^kv_cache_dtype: must be one of \('auto', 'int8'\), got 'int4'"):
        EngineConfig(kv_cache_dtype="int4")
