"""TLS, worker mTLS and API keys on every port (gRPC and HTTP), with real servers (tiny engines, no Ray), real TLS
and real clients (grpc, httpx, the openai SDK).

One cluster serves every test: two workers requiring client certificates from the cluster's CA and the cluster
key on both their ports, and a router speaking TLS on both of its ports with the clients' key set, calling the
workers with the cluster key.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from certificates import Authority, Issued
from grpc_health.v1 import health_pb2, health_pb2_grpc

from radixserve.cluster.base.bus import InProcessBus, WorkerRecord
from radixserve.cluster.base.config import CacheConfig, EngineConfig, RouterConfig, SecurityConfig
from radixserve.cluster.base.loop_thread import LoopThread
from radixserve.cluster.base.metrics import scrape
from radixserve.cluster.base.security import ApiKeys, cluster_keys
from radixserve.cluster.control.client import ClusterClient
from radixserve.router.server import Router
from radixserve.v1 import api_pb2, api_pb2_grpc, types_pb2, worker_pb2, worker_pb2_grpc
from radixserve.worker.engine import Engine
from radixserve.worker.models.checkpoint import Checkpoint
from radixserve.worker.models.loading import open_checkpoint
from radixserve.worker.service import WorkerServer

KEY = "sk-test-0123456789abcdef"
CLUSTER_KEY = "ck-test-fedcba9876543210"
TIMEOUT_S = 30.0


@dataclass
class Secured:
    router: Router
    workers: list[WorkerServer]
    server_cert: Issued
    rogue_client: Issued


@pytest.fixture(scope="module")
def secured(tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    folder = tmp_path_factory.mktemp("tls")
    cluster_ca, rogue_ca = Authority(folder, "cluster"), Authority(folder, "rogue")
    server_cert = cluster_ca.issue("radixserve")
    keys_file = folder / "keys"
    keys_file.write_text(f"# the test's keys\n{KEY}\n\nsk-other\n")
    security = SecurityConfig(cert_file=str(server_cert.cert_file), key_file=str(server_cert.key_file),
                              ca_file=str(server_cert.ca_file), worker_mtls=True, api_keys_file=str(keys_file),
                              cluster_key=CLUSTER_KEY)
    keys = ApiKeys.from_config(security)
    checkpoint = open_checkpoint(tiny_hf_dir)
    config = EngineConfig(model="tiny", cache=CacheConfig(page_size=4, num_pages=64))
    loop = LoopThread("test").start()
    try:
        bus, workers, router = loop.call(_start(security, keys, checkpoint, config), 60)
        try:
            yield Secured(router, workers, server_cert, rogue_ca.issue("intruder"))
        finally:
            loop.call(router.stop(), 60)
            for worker in workers:
                loop.call(worker.stop(grace_s=1), 60)
            loop.call(bus.close(), 60)
    finally:
        loop.stop()


async def _start(security: SecurityConfig, keys: ApiKeys, checkpoint: Checkpoint,
                 config: EngineConfig) -> tuple[InProcessBus, list[WorkerServer], Router]:
    """Two workers and a router, all secured by ``security`` and ``keys`` (created on the running loop)."""
    bus = InProcessBus()
    workers = [WorkerServer(Engine(config, checkpoint), f"w{i}", http_port=0, security=security)
               for i in range(2)]
    for i, worker in enumerate(workers):
        address = await worker.start()
        await bus.announce(WorkerRecord(f"w{i}", address, "tiny", worker.incarnation, 64))
    router = Router(RouterConfig(port=0, http_port=0, health_interval_s=0.05), bus, metrics_port=0,
                    security=security, api_keys=keys)
    await router.start()
    return bus, workers, router


def _channel(address: str, ca_file: Path, client: Issued | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca_file.read_bytes(),
        private_key=client.key_file.read_bytes() if client else None,
        certificate_chain=client.cert_file.read_bytes() if client else None)
    return grpc.secure_channel(address, credentials)


def _request() -> api_pb2.GenerateRequest:
    return api_pb2.GenerateRequest(token_ids=api_pb2.TokenIds(ids=list(range(5, 25))),
                                   sampling=types_pb2.SamplingOptions(max_tokens=3, temperature=0))


def _complete(channel: grpc.Channel, key: str | None) -> api_pb2.CompleteResponse:
    metadata = [("authorization", f"Bearer {key}")] if key is not None else None
    return api_pb2_grpc.GenerationStub(channel).Complete(_request(), timeout=TIMEOUT_S, metadata=metadata)


def test_the_right_key_over_tls_is_served_through_workers_that_require_the_routers_certificate(
        secured: Secured) -> None:
    with _channel(secured.router.address, secured.server_cert.ca_file) as channel:
        answer = _complete(channel, KEY)
    assert len(answer.choices[0].token_ids) == 3
    assert answer.worker_id in {"w0", "w1"}


@pytest.mark.parametrize("key", [None, "sk-wrong", ""], ids=["no-key", "wrong-key", "empty-key"])
def test_a_call_without_an_accepted_key_is_unauthenticated_and_the_router_keeps_serving(
        secured: Secured, key: str | None) -> None:
    with _channel(secured.router.address, secured.server_cert.ca_file) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            _complete(channel, key)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "API key" in refused.value.details()
        assert _complete(channel, KEY).choices[0].token_ids


def test_a_streaming_call_without_a_key_is_unauthenticated(secured: Secured) -> None:
    with _channel(secured.router.address, secured.server_cert.ca_file) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            list(api_pb2_grpc.GenerationStub(channel).Generate(_request(), timeout=TIMEOUT_S))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_answers_without_a_key(secured: Secured) -> None:
    with _channel(secured.router.address, secured.server_cert.ca_file) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_a_plaintext_client_gets_no_answer_from_a_tls_router(secured: Secured) -> None:
    with grpc.insecure_channel(secured.router.address) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            api_pb2_grpc.GenerationStub(channel).Complete(_request(), timeout=5,
                                                          metadata=[("authorization", f"Bearer {KEY}")])
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_clusters_authority_refuses_the_router(secured: Secured) -> None:
    with _channel(secured.router.address, secured.rogue_client.ca_file) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            _complete(channel, KEY)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("client", ["none", "rogue"])
def test_a_worker_refuses_clients_without_a_certificate_from_the_clusters_authority(
        secured: Secured, client: str) -> None:
    certificate = None if client == "none" else secured.rogue_client
    with _channel(secured.workers[0].address, secured.server_cert.ca_file, certificate) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            worker_pb2_grpc.WorkerStub(channel).GetInfo(worker_pb2.GetInfoRequest(), timeout=5,
                                                        metadata=[("authorization", f"Bearer {KEY}")])
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_worker_serves_a_client_with_the_clusters_certificate_and_a_key_only(secured: Secured) -> None:
    stub_for = lambda channel: worker_pb2_grpc.WorkerStub(channel)  # noqa: E731
    with _channel(secured.workers[0].address, secured.server_cert.ca_file, secured.server_cert) as channel:
        info = stub_for(channel).GetInfo(worker_pb2.GetInfoRequest(), timeout=TIMEOUT_S,
                                         metadata=[("authorization", f"Bearer {CLUSTER_KEY}")])
        assert info.worker_id == "w0"
        with pytest.raises(grpc.RpcError) as refused:
            stub_for(channel).GetInfo(worker_pb2.GetInfoRequest(), timeout=TIMEOUT_S)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_keys_appear_in_no_log_line_and_no_metric(secured: Secured, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with _channel(secured.router.address, secured.server_cert.ca_file) as channel:
        for key in ("sk-wrong-guess", KEY):
            try:
                _complete(channel, key)
            except grpc.RpcError:
                pass
    exported = scrape(secured.router.metrics_address)
    for key in ("sk-wrong-guess", KEY, "sk-other", CLUSTER_KEY):
        assert key not in caplog.text
        assert key not in str(exported)


@pytest.mark.parametrize(("settings", "field"), [
    ({"cert_file": "a.pem"}, "key_file"),
    ({"worker_mtls": True}, "worker_mtls"),
    ({"api_keys_env": ""}, "api_keys_env"),
])
def test_an_incomplete_security_config_is_refused_naming_the_setting(settings: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        SecurityConfig(**settings)


def test_keys_come_from_a_file_and_an_environment_variable_and_an_empty_source_is_an_error(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("a\n# comment\n\n b \n")
    keys = ApiKeys.from_config(SecurityConfig(api_keys_file=str(keys_file), api_keys_env="KEYS"),
                               environ={"KEYS": "c, d"})
    assert keys.keys == {"a", "b", "c", "d"}
    assert keys.check("Bearer c") and keys.check("bearer b") and not keys.check("Bearer e")
    assert not keys.check("c") and not keys.check(None)
    assert ApiKeys().check(None)  # no keys configured: nothing required
    with pytest.raises(ValueError, match="^security.api_keys_env: the variable KEYS holds no key"):
        ApiKeys.from_config(SecurityConfig(api_keys_env="KEYS"), environ={})
    with pytest.raises(ValueError, match="^security.api_keys_file: cannot read"):
        ApiKeys.from_config(SecurityConfig(api_keys_file=str(tmp_path / "missing")))


def test_the_python_client_speaks_tls_with_a_key(secured: Secured) -> None:
    ca_file = str(secured.server_cert.ca_file)
    with ClusterClient(secured.router.address, timeout_s=TIMEOUT_S, ca_file=ca_file, api_key=KEY) as client:
        assert client.complete(token_ids=list(range(5, 25))).choices[0].token_ids
    with ClusterClient(secured.router.address, timeout_s=TIMEOUT_S, ca_file=ca_file, api_key=CLUSTER_KEY) as admin:
        assert {w.worker_id for w in admin.list_workers().workers} == {"w0", "w1"}
    with ClusterClient(secured.router.address, timeout_s=TIMEOUT_S, ca_file=ca_file) as keyless:
        with pytest.raises(grpc.RpcError) as refused:
            keyless.list_workers()
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _https(ca_file: Path, client: Issued | None = None) -> httpx.Client:
    """An HTTPS client trusting ``ca_file``, presenting ``client``'s certificate when given."""
    context = ssl.create_default_context(cafile=str(ca_file))
    if client is not None:
        context.load_cert_chain(client.cert_file, client.key_file)
    return httpx.Client(verify=context)


def _completion(client: httpx.Client, url: str, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    body = {"model": "tiny", "prompt": list(range(5, 25)), "max_tokens": 3, "temperature": 0}
    return client.post(f"{url}/v1/completions", json=body, headers=headers, timeout=TIMEOUT_S)


def test_the_routers_https_api_serves_the_right_key_refuses_others_and_keeps_health_open(secured: Secured) -> None:
    url = secured.router.http_url
    assert url is not None and url.startswith("https://")
    with _https(secured.server_cert.ca_file) as client:
        assert client.get(f"{url}/health", timeout=TIMEOUT_S).status_code == 200
        for key in (None, "sk-wrong"):
            refused = _completion(client, url, key)
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] is not None or refused.json()["error"]["type"]
            assert KEY not in refused.text
        served = _completion(client, url, KEY)
    assert served.status_code == 200, served.text
    assert served.json()["usage"]["completion_tokens"] == 3


def test_the_openai_sdk_reaches_the_router_over_https_with_a_key(secured: Secured) -> None:
    with _https(secured.server_cert.ca_file) as http:
        client = openai.OpenAI(base_url=f"{secured.router.http_url}/v1", api_key=KEY, http_client=http)
        answer = client.completions.create(model="tiny", prompt=[5, 6, 7, 8, 9], max_tokens=2, temperature=0)
    assert answer.usage is not None and answer.usage.completion_tokens == 2


def test_an_https_client_that_does_not_trust_the_clusters_authority_refuses_the_router(secured: Secured) -> None:
    with _https(secured.rogue_client.ca_file) as client:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            client.get(f"{secured.router.http_url}/health", timeout=TIMEOUT_S)


def test_plain_http_gets_no_answer_from_the_tls_router(secured: Secured) -> None:
    address = secured.router.http_address
    with httpx.Client() as client:
        with pytest.raises(httpx.HTTPError):
            client.get(f"http://{address}/health", timeout=5)


@pytest.mark.parametrize("client", ["none", "rogue"])
def test_a_workers_https_api_refuses_clients_without_a_certificate_from_the_clusters_authority(
        secured: Secured, client: str) -> None:
    certificate = None if client == "none" else secured.rogue_client
    with _https(secured.server_cert.ca_file, certificate) as http:
        with pytest.raises(httpx.HTTPError):
            _completion(http, f"https://{secured.workers[0].http_address}", KEY)


def test_a_workers_https_api_serves_the_clusters_certificate_with_a_key(secured: Secured) -> None:
    with _https(secured.server_cert.ca_file, secured.server_cert) as http:
        url = f"https://{secured.workers[0].http_address}"
        assert _completion(http, url, None).status_code == 401
        served = _completion(http, url, CLUSTER_KEY)
    assert served.status_code == 200, served.text


def _worker_calls(stub: worker_pb2_grpc.WorkerStub, metadata: list[tuple[str, str]]) -> dict[str, Callable[[], object]]:
    """Every method of the internal worker API, each as one call with ``metadata``."""
    generate = worker_pb2.WorkerGenerateRequest(request_id="bypass", token_ids=list(range(5, 25)),
                                                sampling=types_pb2.SamplingOptions(max_tokens=2))
    return {
        "GetInfo": lambda: stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=TIMEOUT_S, metadata=metadata),
        "GetLoad": lambda: stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=TIMEOUT_S, metadata=metadata),
        "StreamKvEvents": lambda: next(stub.StreamKvEvents(worker_pb2.StreamKvEventsRequest(), timeout=TIMEOUT_S,
                                                           metadata=metadata)),
        "Generate": lambda: list(stub.Generate(generate, timeout=TIMEOUT_S, metadata=metadata)),
        "FlushCache": lambda: stub.FlushCache(worker_pb2.FlushCacheRequest(), timeout=TIMEOUT_S, metadata=metadata),
    }


@pytest.mark.parametrize("method", ["GetInfo", "GetLoad", "StreamKvEvents", "Generate", "FlushCache"])
def test_a_client_key_opens_no_method_of_a_workers_internal_api(secured: Secured, method: str) -> None:
    with _channel(secured.workers[0].address, secured.server_cert.ca_file, secured.server_cert) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            _worker_calls(stub, [("authorization", f"Bearer {KEY}")])[method]()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _worker_calls(stub, [("authorization", f"Bearer {CLUSTER_KEY}")])[method]() is not None


def test_list_workers_is_an_admin_call_that_needs_the_cluster_key(secured: Secured) -> None:
    with _channel(secured.router.address, secured.server_cert.ca_file) as channel:
        stub = api_pb2_grpc.GenerationStub(channel)
        list_with = lambda key: stub.ListWorkers(api_pb2.ListWorkersRequest(), timeout=TIMEOUT_S,  # noqa: E731
                                                 metadata=[("authorization", f"Bearer {key}")])
        with pytest.raises(grpc.RpcError) as denied:
            list_with(KEY)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED and "cluster key" in denied.value.details()
        with pytest.raises(grpc.RpcError) as refused:
            list_with("sk-wrong")
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert {w.worker_id for w in list_with(CLUSTER_KEY).workers} == {"w0", "w1"}
        with pytest.raises(grpc.RpcError) as not_a_client_key:
            _complete(channel, CLUSTER_KEY)
        assert not_a_client_key.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_workers_https_api_refuses_a_client_key(secured: Secured) -> None:
    with _https(secured.server_cert.ca_file, secured.server_cert) as http:
        assert _completion(http, f"https://{secured.workers[0].http_address}", KEY).status_code == 401


def test_api_keys_without_a_cluster_key_are_refused_naming_the_setting(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(KEY)
    security = SecurityConfig(api_keys_file=str(keys_file))
    with pytest.raises(ValueError, match="^security.cluster_key: required with API keys"):
        cluster_keys(security)
    assert CLUSTER_KEY not in repr(SecurityConfig(cluster_key=CLUSTER_KEY))
