"""A worker dying under load: no request is lost, and the router uses the worker again once Ray restarts it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import ray
from cluster_calls import chat_request, system_prompt, wait_for, workers_by_id

from radixserve.cluster.control.pool import RAY_NAMESPACE, worker_name
from radixserve.v1 import api_pb2_grpc

MAX_TOKENS = 48


def _outcome(stub: api_pb2_grpc.GenerationStub, topic: str) -> tuple[str, object]:
    """("done", worker, tokens, reasons) for a finished request, ("error", code, details) for a failed one."""
    request = chat_request(system_prompt(topic, 10), f"Describe {topic}.", max_tokens=MAX_TOKENS, ignore_eos=True)
    try:
        parts = list(stub.Generate(request, timeout=300))
    except grpc.RpcError as error:
        return ("error", (error.code(), error.details()))
    tokens = [t for p in parts for c in p.choices for t in c.token_ids]
    reasons = [c.finish_reason for p in parts for c in p.choices if c.finish_reason]
    return ("done", (parts[0].worker_id, len(tokens), reasons))


def test_killing_a_worker_mid_load_loses_no_request(stub: api_pb2_grpc.GenerationStub, cluster):
    victim = worker_name(0)
    before = workers_by_id(stub)[victim]
    topics = [f"topic {i}" for i in range(12)]
    with ThreadPoolExecutor(max_workers=len(topics)) as pool:
        futures = [pool.submit(_outcome, stub, topic) for topic in topics]
        wait_for(lambda: workers_by_id(stub)[victim].load.num_running > 0, 60, "the victim to be busy")
        ray.kill(ray.get_actor(victim, namespace=RAY_NAMESPACE), no_restart=False)
        outcomes = [f.result(timeout=600) for f in futures]

    for kind, detail in outcomes:
        if kind == "done":
            _, num_tokens, reasons = detail
            assert num_tokens == MAX_TOKENS and reasons == ["length"]
        else:
            code, details = detail
            assert code == grpc.StatusCode.UNAVAILABLE and victim in details, (code, details)
    assert any(kind == "done" for kind, _ in outcomes)

    def restarted() -> bool:
        status = workers_by_id(stub)[victim]
        return status.state == "up" and status.load.incarnation != before.load.incarnation and status.events_live

    wait_for(restarted, 300, "Ray to restart the killed worker and the router to see it")
    routed = workers_by_id(stub)[victim].num_routed
    with ThreadPoolExecutor(max_workers=6) as pool:
        after = list(pool.map(lambda t: _outcome(stub, t), [f"later {i}" for i in range(6)]))
    assert all(kind == "done" for kind, _ in after), after
    assert workers_by_id(stub)[victim].num_routed > routed, "the router never used the restarted worker"
    assert victim in {detail[0] for _, detail in after}
