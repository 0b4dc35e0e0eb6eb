"""The worker's gRPC service end to end over 127.0.0.1 with the tiny model, and the engine hooks it relies on."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import uvloop
from conditions import until
from engine_runs import Completed, run_to_completion
from gated_engine import GatedEngine
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from undecodable import call_raw, refused, request_class, undecodable

from radixserve.cluster.base.config import CacheConfig, EngineConfig, SchedulerConfig
from radixserve.cluster.base.hashing import namespace_seed, page_hashes
from radixserve.cluster.base.loop_thread import LoopThread
from radixserve.cluster.base.sampling_params import SamplingParams
from radixserve.cluster.base.tokenizer import Tokenizer
from radixserve.cluster.base.wire import sampling_options_to_proto
from radixserve.v1 import types_pb2, worker_pb2, worker_pb2_grpc
from radixserve.worker.engine import Engine
from radixserve.worker.kv.radix_cache import KVEvent
from radixserve.worker.models.checkpoint import Checkpoint
from radixserve.worker.models.loading import open_checkpoint
from radixserve.worker.kv_hub import KvEventHub, KvSubscriberLagged
from radixserve.worker.service import SERVICE_NAME, WorkerServer

T = TypeVar("T")
Responses = list[worker_pb2.WorkerGenerateResponse]
PAGE = 4
NUM_PAGES = 256
RPC_TIMEOUT_S = 30.0
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
LONG = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)  # fits the 256-token context
PROMPT = [(7 * i + 3) % 300 + 5 for i in range(30)]  # 7 full pages and 2 tokens


@pytest.fixture(scope="module")
def checkpoint(tiny_hf_dir: Path) -> Checkpoint:
    return open_checkpoint(tiny_hf_dir)


def make_engine(checkpoint: Checkpoint, waiting: int = 64) -> GatedEngine:
    config = EngineConfig(model="tiny", cache=CacheConfig(page_size=PAGE, num_pages=NUM_PAGES),
                          scheduler=SchedulerConfig(max_num_batched_tokens=256, max_waiting_requests=waiting))
    return GatedEngine(config, checkpoint)


def run(main: Callable[[], Awaitable[T]]) -> T:
    """Runs an async test body on a fresh loop, bounded in time."""
    async def bounded() -> T:
        return await asyncio.wait_for(main(), 120)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # the loop every serving process runs
        return runner.run(bounded())


@contextlib.asynccontextmanager
async def serving(engine: GatedEngine) -> AsyncIterator[tuple[WorkerServer, grpc.aio.Channel]]:
    """A started server for ``engine`` and a channel to it; stops it (gate open) on the way out."""
    server = WorkerServer(engine, "worker-0")
    address = await server.start()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            yield server, channel
    finally:
        engine.gate.set()
        await server.stop(grace_s=5)


def request(prompt: list[int], params: SamplingParams = GREEDY,
            request_id: str = "r") -> worker_pb2.WorkerGenerateRequest:
    return worker_pb2.WorkerGenerateRequest(request_id=request_id, token_ids=prompt,
                                            sampling=sampling_options_to_proto(params))


async def generate(stub: worker_pb2_grpc.WorkerStub,
                   req: worker_pb2.WorkerGenerateRequest) -> Responses:
    return [response async for response in stub.Generate(req, timeout=RPC_TIMEOUT_S)]


def direct_run(checkpoint: Checkpoint, prompt: list[int], params: SamplingParams) -> Completed:
    engine = make_engine(checkpoint)
    engine.add_request(prompt, params, "direct")
    return run_to_completion(engine)["direct"]


def stream_tokens(responses: Responses) -> list[int]:
    return [t for r in responses for c in r.choices for t in c.token_ids]


# ---- Generate -----------------------------------------------------------------------------------------


def test_stream_equals_a_direct_engine_run_and_a_repeat_hits_the_cache(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint)

    async def main() -> tuple[Responses, Responses]:
        async with serving(engine) as (_, channel):
            stub = worker_pb2_grpc.WorkerStub(channel)
            return await generate(stub, request(PROMPT, request_id="a")), await generate(stub, request(PROMPT))

    first, again = run(main)
    expected = direct_run(checkpoint, PROMPT, GREEDY).samples[0]
    assert stream_tokens(first) == stream_tokens(again) == expected.token_ids
    assert "".join(c.text for r in first for c in r.choices) == expected.text
    logprobs = [lp for r in first for c in r.choices for lp in c.logprobs]
    assert [lp.token_id for lp in logprobs] == [lp.token_id for lp in expected.logprobs]
    for got, want in zip(logprobs, expected.logprobs, strict=True):
        assert got.logprob == pytest.approx(want.logprob, rel=1e-5, abs=1e-5)
        assert [(t.token_id, pytest.approx(t.logprob, rel=1e-5, abs=1e-5)) for t in got.top] == list(want.top)
    assert [r.finished for r in first] == [False] * (len(first) - 1) + [True]
    assert [c.finish_reason for r in first for c in r.choices] == [""] * (len(logprobs) - 1) + ["length"]
    assert {r.num_prompt_tokens for r in first} == {len(PROMPT)}
    assert first[-1].num_cached_tokens == 0 and again[-1].num_cached_tokens == 28  # whole pages


def test_n_samples_stream_as_indexed_choices(checkpoint: Checkpoint) -> None:
    params = SamplingParams(max_tokens=6, temperature=1.0, n=3, seed=5, ignore_eos=True)
    engine = make_engine(checkpoint)

    async def main() -> Responses:
        async with serving(engine) as (_, channel):
            return await generate(worker_pb2_grpc.WorkerStub(channel), request(PROMPT, params))

    responses = run(main)
    expected = direct_run(checkpoint, PROMPT, params)
    for index in range(3):
        chunks = [c for r in responses for c in r.choices if c.index == index]
        assert [t for c in chunks for t in c.token_ids] == expected.samples[index].token_ids
        assert chunks[-1].finish_reason == "length"


def bad_sampling(**options: Any) -> worker_pb2.WorkerGenerateRequest:
    """A request with raw ``SamplingOptions`` (``SamplingParams`` would refuse to build bad ones)."""
    return worker_pb2.WorkerGenerateRequest(request_id="r", token_ids=PROMPT,
                                            sampling=types_pb2.SamplingOptions(**options))


BAD_FIELDS = [
    ("token_ids", request([])),
    ("token_ids", request([5, 320])),  # the tiny vocabulary is [0, 320)
    ("token_ids", request([5] * 256)),  # no room left in the 256-token context
    ("request_id", request(PROMPT, request_id="")),
    ("request_id", request(PROMPT, request_id="x" * 129)),
    ("sampling.max_tokens", bad_sampling(max_tokens=0)),
    ("sampling.top_p", bad_sampling(top_p=1.5)),
    ("sampling.temperature", bad_sampling(temperature=-1.0)),
    ("sampling.n", bad_sampling(n=0)),
    ("sampling.stop_token_ids", bad_sampling(stop_token_ids=[10**6])),  # valid sampling, outside the vocabulary
]


@pytest.mark.parametrize("field,bad", BAD_FIELDS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_FIELDS)])
def test_a_bad_field_is_invalid_argument_naming_it_and_the_worker_keeps_serving(
        checkpoint: Checkpoint, field: str, bad: worker_pb2.WorkerGenerateRequest) -> None:
    engine = make_engine(checkpoint)

    async def main() -> tuple[grpc.aio.AioRpcError, Responses]:
        async with serving(engine) as (_, channel):
            stub = worker_pb2_grpc.WorkerStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await generate(stub, bad)
            return refused.value, await generate(stub, request(PROMPT, request_id="x" * 128))

    error, good = run(main)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"{field}: "), error.details()
    assert stream_tokens(good) == direct_run(checkpoint, PROMPT, GREEDY).tokens


def test_an_id_in_flight_is_already_exists_and_a_full_queue_is_resource_exhausted(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint, waiting=1)
    engine.gate.clear()

    async def main() -> tuple[grpc.aio.AioRpcError, grpc.aio.AioRpcError, Responses]:
        async with serving(engine) as (_, channel):
            stub = worker_pb2_grpc.WorkerStub(channel)
            held = asyncio.create_task(generate(stub, request(PROMPT, request_id="held")))
            await until(engine.has_unfinished, "the request to reach the engine")
            with pytest.raises(grpc.aio.AioRpcError) as duplicate:
                await generate(stub, request(PROMPT, request_id="held"))
            with pytest.raises(grpc.aio.AioRpcError) as overloaded:
                await generate(stub, request(PROMPT, request_id="other"))
            engine.gate.set()
            await held
            return duplicate.value, overloaded.value, await generate(stub, request(PROMPT, request_id="other"))

    duplicate, overloaded, later = run(main)
    assert duplicate.code() == grpc.StatusCode.ALREADY_EXISTS and "held" in duplicate.details()
    assert overloaded.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "overloaded" in overloaded.details()
    assert stream_tokens(later) == direct_run(checkpoint, PROMPT, GREEDY).tokens


async def pages_released(stub: worker_pb2_grpc.WorkerStub) -> bool:
    load = await stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=RPC_TIMEOUT_S)
    return (load.num_running, load.num_waiting, load.num_pages_free + load.num_pages_evictable) == (0, 0, NUM_PAGES)


def test_cancelling_a_stream_aborts_the_request_and_frees_its_pages(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint)

    async def main() -> int:
        async with serving(engine) as (_, channel):
            stub = worker_pb2_grpc.WorkerStub(channel)
            call = stub.Generate(request(PROMPT, LONG), timeout=RPC_TIMEOUT_S)
            received = [await call.read() for _ in range(3)]
            assert not await pages_released(stub)  # the request holds pages while it runs
            call.cancel()
            await until(lambda: pages_released(stub), "the request's pages to be freed")
            return len(stream_tokens(received))

    num_received = run(main)
    assert num_received >= 3
    assert not engine.has_unfinished()
    assert engine.stats.num_generated_tokens < LONG.max_tokens  # cut short, not run to the end
    assert engine.stats.num_requests_finished == 1


def test_a_passed_deadline_aborts_the_request(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint)
    engine.gate.clear()

    async def main() -> grpc.aio.AioRpcError:
        async with serving(engine) as (_, channel):
            stub = worker_pb2_grpc.WorkerStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as expired:
                [r async for r in stub.Generate(request(PROMPT, LONG), timeout=0.5)]
            engine.gate.set()
            await until(lambda: pages_released(stub), "the request's pages to be freed")
            return expired.value

    assert run(main).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not engine.has_unfinished()
    assert engine.stats.num_generated_tokens < LONG.max_tokens  # aborted, not run to the end


# ---- KV events ----------------------------------------------------------------------------------------


async def read_batch(stream: Any) -> worker_pb2.KvEventBatch:
    batch = await asyncio.wait_for(stream.read(), RPC_TIMEOUT_S)
    assert batch is not grpc.aio.EOF
    return batch


class View:
    """A subscriber's accumulated view of a worker's cache, checking the stream's contract as it goes: a reset
    batch first, then live batches numbered on from the reset's sequence."""

    def __init__(self, incarnation: str) -> None:
        self.incarnation = incarnation
        self.hashes: set[int] = set()
        self.removed: list[int] = []
        self.sequence: int | None = None  # of the last batch applied
        self.history: dict[int, frozenset[int]] = {}  # sequence -> the cache after that batch

    async def apply_next(self, stream: Any) -> None:
        batch = await read_batch(stream)
        assert (batch.worker_id, batch.incarnation) == ("worker-0", self.incarnation)
        assert batch.reset == (self.sequence is None)
        assert self.sequence is None or batch.sequence == self.sequence + 1
        self.sequence = batch.sequence
        for event in batch.events:
            if event.kind == worker_pb2.KvEvent.STORED:
                assert not self.hashes & set(event.page_hashes), "a page stored twice"
                self.hashes.update(event.page_hashes)
            else:
                assert event.kind == worker_pb2.KvEvent.REMOVED
                assert set(event.page_hashes) <= self.hashes, "an unknown page removed"
                self.hashes.difference_update(event.page_hashes)
                self.removed += event.page_hashes
        self.history[batch.sequence] = frozenset(self.hashes)

    async def apply_through(self, stream: Any, sequence: int) -> None:
        while self.sequence is None or self.sequence < sequence:
            await self.apply_next(stream)

    async def apply_until(self, stream: Any, condition: Callable[[], bool]) -> None:
        while not condition():
            await self.apply_next(stream)


def test_kv_events_snapshot_then_live_stored_and_flushed_pages(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint)
    one_token = SamplingParams(max_tokens=1, temperature=0)  # caches exactly the prompt's full pages
    expected = page_hashes(PROMPT, PAGE, namespace_seed(engine.config.hash_namespace))

    async def main() -> None:
        async with serving(engine) as (server, channel):
            stub = worker_pb2_grpc.WorkerStub(channel)
            first, second = View(server.incarnation), View(server.incarnation)
            stream = stub.StreamKvEvents(worker_pb2.StreamKvEventsRequest(), timeout=RPC_TIMEOUT_S)
            await first.apply_next(stream)
            assert first.hashes == set()
            await generate(stub, request(PROMPT, one_token))
            await first.apply_until(stream, lambda: len(first.hashes) == len(expected))
            assert first.hashes == set(expected)
            late = stub.StreamKvEvents(worker_pb2.StreamKvEventsRequest(), timeout=RPC_TIMEOUT_S)
            await second.apply_next(late)
            assert second.hashes == first.hashes
            flushed = await stub.FlushCache(worker_pb2.FlushCacheRequest(), timeout=RPC_TIMEOUT_S)
            assert flushed.num_pages_freed == len(expected)
            for view, events in ((first, stream), (second, late)):
                await view.apply_until(events, lambda v=view: not v.hashes)
                assert sorted(view.removed) == sorted(expected)
            cold = View(server.incarnation)
            await cold.apply_next(stub.StreamKvEvents(worker_pb2.StreamKvEventsRequest(), timeout=RPC_TIMEOUT_S))
            assert cold.hashes == set()

    run(main)


def test_a_subscriber_joining_under_load_sees_what_an_early_one_sees(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint)
    prompts = [[(13 * i + 5 * j) % 300 + 5 for j in range(20 + i)] for i in range(12)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    async def main() -> None:
        async with serving(engine) as (server, channel):
            stub = worker_pb2_grpc.WorkerStub(channel)
            early, late = View(server.incarnation), View(server.incarnation)
            early_stream = stub.StreamKvEvents(worker_pb2.StreamKvEventsRequest(), timeout=RPC_TIMEOUT_S)
            await early.apply_next(early_stream)
            work = [asyncio.create_task(generate(stub, request(p, params, str(i)))) for i, p in enumerate(prompts)]
            await early.apply_until(early_stream, lambda: bool(early.hashes))  # join once pages are cached
            late_stream = stub.StreamKvEvents(worker_pb2.StreamKvEventsRequest(), timeout=RPC_TIMEOUT_S)
            await late.apply_next(late_stream)
            assert late.sequence is not None
            await early.apply_through(early_stream, late.sequence)
            assert early.history[late.sequence] == late.hashes  # the snapshot is the cache after that batch
            await asyncio.gather(*work)
            await stub.FlushCache(worker_pb2.FlushCacheRequest(), timeout=RPC_TIMEOUT_S)
            extra = [(9 * j) % 300 + 5 for j in range(17)]  # one more change, seen by both after everything else
            await generate(stub, request(extra, SamplingParams(max_tokens=1, temperature=0)))
            final = set(page_hashes(extra, PAGE, namespace_seed("tiny")))
            await early.apply_until(early_stream, lambda: early.hashes == final)
            await late.apply_until(late_stream, lambda: late.hashes == final)

    run(main)


def test_a_late_snapshot_carries_the_sequence_of_the_last_batch_in_it_and_live_batches_go_on_from_it(
        checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint)
    one_token = SamplingParams(max_tokens=1, temperature=0)
    other = [(5 * j) % 300 + 7 for j in range(9)]

    async def main() -> None:
        async with serving(engine) as (server, channel):
            stub = worker_pb2_grpc.WorkerStub(channel)
            early, late = View(server.incarnation), View(server.incarnation)
            early_stream = stub.StreamKvEvents(worker_pb2.StreamKvEventsRequest(), timeout=RPC_TIMEOUT_S)
            await early.apply_next(early_stream)
            assert early.sequence == 0  # nothing published yet
            await generate(stub, request(PROMPT, one_token))
            await early.apply_until(early_stream, lambda: bool(early.hashes))
            late_stream = stub.StreamKvEvents(worker_pb2.StreamKvEventsRequest(), timeout=RPC_TIMEOUT_S)
            await late.apply_next(late_stream)
            assert late.sequence is not None and late.sequence >= 1
            await early.apply_through(early_stream, late.sequence)
            assert early.history[late.sequence] == late.hashes
            await generate(stub, request(other, one_token))
            final = set(page_hashes(PROMPT, PAGE, namespace_seed("tiny"))) | set(
                page_hashes(other, PAGE, namespace_seed("tiny")))
            for view, stream in ((early, early_stream), (late, late_stream)):
                await view.apply_until(stream, lambda v=view: v.hashes == final)
            assert early.sequence == late.sequence

    run(main)


def test_a_lagging_subscriber_is_dropped_without_holding_up_others() -> None:
    async def main() -> None:
        hub = KvEventHub(max_pending_batches=2)
        hub.publish([KVEvent("stored", (1, 2))])
        with hub.subscribe() as slow, hub.subscribe() as fast:
            assert slow.snapshot == fast.snapshot == (1, 2)
            assert slow.sequence == fast.sequence == 1
            batches = [(KVEvent("stored", (3,)),), (KVEvent("removed", (1,)),), (KVEvent("stored", (4,)),)]
            for sequence, batch in enumerate(batches, start=2):
                hub.publish(batch)
                assert await asyncio.wait_for(fast.next_batch(), 1) == (sequence, batch)
            with pytest.raises(KvSubscriberLagged):
                await asyncio.wait_for(slow.next_batch(), 1)
            with hub.subscribe() as late:
                assert late.snapshot == hub.cached_hashes == (2, 3, 4)
                assert late.sequence == 4

    run(main)


# ---- undecodable requests ------------------------------------------------------------------------------

WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Worker"]


@pytest.fixture(scope="module")
def raw_worker(checkpoint: Checkpoint) -> Iterator[grpc.Channel]:
    """A channel to a worker served from a loop in another thread, for synchronous raw calls."""
    thread = LoopThread("test").start()
    server = WorkerServer(make_engine(checkpoint), "worker-0")
    try:
        with grpc.insecure_channel(thread.call(server.start(), 60)) as channel:
            yield channel
        thread.call(server.stop(grace_s=5), 60)
    finally:
        thread.stop()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_undecodable_bytes_are_invalid_argument_naming_the_message(raw_worker: grpc.Channel,
                                                                   data: st.DataObject) -> None:
    method = data.draw(st.sampled_from(list(WORKER_SERVICE.methods)), label="method")
    with refused(method):
        call_raw(raw_worker, method, data.draw(undecodable(request_class(method)), label="bytes"), RPC_TIMEOUT_S)


def test_the_worker_has_no_abort_method(raw_worker: grpc.Channel) -> None:
    """Routers abort a request by cancelling its Generate call or by an abort message on its Session stream;
    there is no separate Abort."""
    with pytest.raises(grpc.RpcError) as caught:
        raw_worker.unary_unary("/radixserve.v1.Worker/Abort")(b"", timeout=RPC_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_the_worker_serves_after_undecodable_bytes(checkpoint: Checkpoint, raw_worker: grpc.Channel) -> None:
    generate_method = WORKER_SERVICE.methods_by_name["Generate"]
    with refused(generate_method):
        call_raw(raw_worker, generate_method, b"\x0a\x02\xff\xfe", RPC_TIMEOUT_S)  # request_id: bad UTF-8
    responses = list(worker_pb2_grpc.WorkerStub(raw_worker).Generate(request(PROMPT), timeout=RPC_TIMEOUT_S))
    assert stream_tokens(responses) == direct_run(checkpoint, PROMPT, GREEDY).tokens


# ---- info, load, health, reflection, drain ------------------------------------------------------------


def test_info_and_load_describe_the_engine(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint)

    async def main() -> tuple[str, str, worker_pb2.WorkerInfo, types_pb2.LoadReport]:
        async with serving(engine) as (server, channel):
            stub = worker_pb2_grpc.WorkerStub(channel)
            for request_id in ("a", "b"):
                await generate(stub, request(PROMPT, request_id=request_id))
            info = await stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=RPC_TIMEOUT_S)
            load = await stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=RPC_TIMEOUT_S)
            assert server.address is not None
            return server.address, server.incarnation, info, load

    address, incarnation, info, load = run(main)
    assert (info.worker_id, info.address, info.incarnation, info.model, info.hash_namespace) == (
        "worker-0", address, incarnation, "tiny", "tiny")
    assert (info.page_size, info.num_pages, info.max_model_len, info.vocab_size) == (PAGE, NUM_PAGES, 256, 320)
    assert (info.max_running_requests, info.max_waiting_requests) == (64, 64)
    spec = info.tokenizer
    assert spec.HasField("bos_token_id") and spec.HasField("eos_token_id")
    assert (spec.bos_token_id, spec.eos_token_id) == (engine.tokenizer.bos_token_id, engine.tokenizer.eos_token_id)
    rebuilt = Tokenizer.from_json(spec.backend_json, bos_token_id=spec.bos_token_id,
                                  eos_token_id=spec.eos_token_id, chat_template=spec.chat_template)
    chat = [{"role": "user", "content": "Hi there"}]
    assert rebuilt.apply_chat_template(chat) == engine.tokenizer.apply_chat_template(chat)
    assert rebuilt.encode(rebuilt.apply_chat_template(chat)) == engine.tokenizer.encode(
        engine.tokenizer.apply_chat_template(chat))
    assert (load.num_running, load.num_waiting, load.incarnation) == (0, 0, incarnation)
    assert (load.num_prompt_tokens, load.num_cached_prompt_tokens) == (2 * len(PROMPT), 28)
    assert load.hit_ratio == pytest.approx(28 / 60)
    assert (load.num_requests_finished, load.num_generated_tokens) == (2, 2 * GREEDY.max_tokens)
    assert load.num_pages_used == NUM_PAGES - load.num_pages_free == load.num_pages_evictable > 0


async def health_status(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_S)
    return response.status


async def is_not_serving(channel: grpc.aio.Channel, service: str) -> bool:
    return await health_status(channel, service) == health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_reflection_and_a_graceful_drain(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint)
    engine.gate.clear()

    async def main() -> None:
        server = WorkerServer(engine, "worker-0")
        async with grpc.aio.insecure_channel(await server.start()) as channel:
            for service in ("", SERVICE_NAME):
                assert await health_status(channel, service) == health_pb2.HealthCheckResponse.SERVING
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            answers = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                   timeout=RPC_TIMEOUT_S)
            listed = [s.name async for answer in answers for s in answer.list_services_response.service]
            assert SERVICE_NAME in listed
            stub = worker_pb2_grpc.WorkerStub(channel)
            in_flight = asyncio.create_task(generate(stub, request(PROMPT)))
            await until(engine.has_unfinished, "the request to reach the engine")
            stopping = asyncio.create_task(server.stop(grace_s=RPC_TIMEOUT_S))
            await until(lambda: is_not_serving(channel, SERVICE_NAME), "health NOT_SERVING")
            assert await health_status(channel, "") == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await generate(stub, request(PROMPT, request_id="late"))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert refused.value.details() == "worker is draining"
            assert not stopping.done()  # waiting for the request in flight
            engine.gate.set()
            assert stream_tokens(await in_flight) == direct_run(checkpoint, PROMPT, GREEDY).tokens
            await asyncio.wait_for(stopping, RPC_TIMEOUT_S)

    run(main)
    assert not engine.has_unfinished()


def test_stop_ends_kv_streams_and_cancels_what_outlives_the_grace(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint)
    engine.gate.clear()

    async def main() -> tuple[grpc.aio.AioRpcError, grpc.aio.AioRpcError]:
        server = WorkerServer(engine, "worker-0")
        async with grpc.aio.insecure_channel(await server.start()) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            events = stub.StreamKvEvents(worker_pb2.StreamKvEventsRequest(), timeout=RPC_TIMEOUT_S)
            await read_batch(events)
            stuck = asyncio.create_task(generate(stub, request(PROMPT, LONG)))
            await until(engine.has_unfinished, "the request to reach the engine")
            await server.stop(grace_s=0.2)
            engine.gate.set()
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await read_batch(events)
            with pytest.raises(grpc.aio.AioRpcError) as cancelled:
                await stuck
            await until(lambda: not engine.has_unfinished(), "the engine to finish")
            return ended.value, cancelled.value

    ended, cancelled = run(main)
    assert (ended.code(), ended.details()) == (grpc.StatusCode.UNAVAILABLE, "worker is stopping")
    assert cancelled.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert engine.stats.num_generated_tokens < LONG.max_tokens  # aborted, not run to the end
    assert engine.cache.num_locked_pages == 0


def test_the_server_runs_on_a_loop_in_another_thread(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = WorkerServer(engine, "worker-0")
    try:
        address = asyncio.run_coroutine_threadsafe(server.start(), loop).result(RPC_TIMEOUT_S)
        with grpc.insecure_channel(address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            responses = list(stub.Generate(request(PROMPT), timeout=RPC_TIMEOUT_S))
            flushed = stub.FlushCache(worker_pb2.FlushCacheRequest(), timeout=RPC_TIMEOUT_S)
        asyncio.run_coroutine_threadsafe(server.stop(grace_s=5), loop).result(RPC_TIMEOUT_S)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(RPC_TIMEOUT_S)
        loop.stop()
    assert stream_tokens(responses) == direct_run(checkpoint, PROMPT, GREEDY).tokens
    assert flushed.num_pages_freed == (len(PROMPT) + GREEDY.max_tokens - 1) // PAGE  # the last token has no KV


# ---- engine hooks the service relies on ---------------------------------------------------------------


def test_flush_and_events_from_another_thread_while_the_engine_steps(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint)
    prompts = [[(11 * i + 3 * j) % 300 + 5 for j in range(24)] for i in range(16)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    stored: list[int] = []
    removed: list[int] = []
    freed = 0

    def take() -> None:
        for event in engine.take_events():
            (stored if event.kind == "stored" else removed).extend(event.page_hashes)

    async def main() -> None:
        nonlocal freed
        work = [asyncio.create_task(_collect(engine, p, params)) for p in prompts]
        while not all(task.done() for task in work):
            freed += await asyncio.to_thread(lambda: engine.flush_cache().result(RPC_TIMEOUT_S))
            await asyncio.to_thread(take)
            await asyncio.sleep(0.005)  # the pace of the flushes while the requests run
        await asyncio.gather(*work)

    run(main)
    freed += engine.flush_cache().result(0)
    take()
    assert freed == len(removed) > 0  # the pool never ran short, so only flushes removed pages
    assert sorted(removed) == sorted(stored)  # every stored page was removed exactly once
    load = engine.load()
    assert (load.num_pages_free, load.num_pages_used, load.num_running, load.num_waiting) == (NUM_PAGES, 0, 0, 0)
    assert load.num_requests_finished == len(prompts)


async def _collect(engine: Engine, prompt: list[int], params: SamplingParams) -> None:
    async for _ in engine.generate(prompt, params):
        pass
