"""A failure in one request's own work fails that request alone; the engine's seed; no driver task left behind."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from engine_runs import assert_all_pages_free, prompts, run_to_completion

from radixserve.cluster.base.config import CacheConfig, EngineConfig, SchedulerConfig
from radixserve.cluster.base.sampling_params import SamplingParams
from radixserve.cluster.base.wire import sampling_options_to_proto
from radixserve.v1 import worker_pb2, worker_pb2_grpc
from radixserve.worker.engine import Engine, RequestFailed
from radixserve.worker.models.checkpoint import Checkpoint
from radixserve.worker.models.loading import open_checkpoint
from radixserve.worker.service import WorkerServer

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tiny_hf_dir: Path) -> Checkpoint:
    return open_checkpoint(tiny_hf_dir)


def make_engine(checkpoint: Checkpoint, seed: int = 0) -> Engine:
    return Engine(EngineConfig(model="tiny", seed=seed, cache=CacheConfig(page_size=4, num_pages=256),
                               scheduler=SchedulerConfig(max_num_batched_tokens=256)), checkpoint)


def poison_stop_checks(engine: Engine, request_id: str, after: int) -> None:
    """Make the request's stop checking raise once it has ``after`` tokens: a fault in its own work."""
    checker = engine._requests[request_id].checkers[0]  # fault injection needs the engine's internals
    append = checker.append

    def failing(token_id: int) -> str | None:
        if checker.seq.num_generated >= after:
            raise RuntimeError("detokenizer exploded")
        return append(token_id)

    checker.append = failing  # type: ignore[method-assign]


def solo(checkpoint: Checkpoint, prompt: list[int]) -> list[int]:
    engine = make_engine(checkpoint)
    engine.add_request(prompt, GREEDY, "solo")
    return run_to_completion(engine)["solo"].tokens


def test_a_failing_stop_check_fails_its_request_alone(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint)
    work = prompts(3, 20, seed=1)
    for i, prompt in enumerate(work):
        engine.add_request(prompt, GREEDY, f"r{i}")
    poison_stop_checks(engine, "r1", after=3)
    errors: dict[str, str] = {}
    done = {}
    while engine.has_unfinished():
        for output in engine.step():
            if output.error is not None:
                errors[output.request_id] = output.error
                assert output.finished and not output.outputs
            else:
                done.setdefault(output.request_id, []).extend(t for o in output.outputs for t in o.token_ids)
    assert list(errors) == ["r1"]
    assert errors["r1"].startswith("request 'r1' failed: RuntimeError: detokenizer exploded")
    assert done["r0"] == solo(checkpoint, work[0]) and done["r2"] == solo(checkpoint, work[2])
    assert_all_pages_free(engine)
    engine.add_request(work[1], GREEDY, "again")  # the engine goes on serving
    assert run_to_completion(engine)["again"].tokens == solo(checkpoint, work[1])


def test_a_row_the_sampler_cannot_take_fails_only_its_request(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint)
    work = prompts(3, 12, seed=2)
    params = SamplingParams(max_tokens=8, temperature=0.8, seed=5, ignore_eos=True)
    for i, prompt in enumerate(work):
        engine.add_request(prompt, params, f"r{i}")
    engine._requests["r2"].seqs[0].sampling.vocab_size = 7  # its state no longer fits the logits
    errors, finished = {}, set()
    while engine.has_unfinished():
        for output in engine.step():
            if output.error is not None:
                errors[output.request_id] = output.error
            elif output.finished:
                finished.add(output.request_id)
    assert list(errors) == ["r2"] and "ValueError" in errors["r2"]
    assert finished == {"r0", "r1"}
    assert_all_pages_free(engine)


def test_generate_raises_request_failed_for_that_stream_only_and_leaves_no_task(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint)
    work = prompts(2, 20, seed=3)

    async def stream(prompt: list[int], request_id: str) -> list[int]:
        tokens: list[int] = []
        async for output in engine.generate(prompt, GREEDY, request_id):
            tokens += [t for o in output.outputs for t in o.token_ids]
            if request_id == "bad" and request_id in engine._requests:
                poison_stop_checks(engine, request_id, after=2)
        return tokens

    async def main() -> tuple[list[int] | BaseException, ...]:
        results = await asyncio.gather(stream(work[0], "good"), stream(work[1], "bad"), return_exceptions=True)
        for _ in range(100):
            if asyncio.all_tasks() == {asyncio.current_task()}:
                break
            await asyncio.sleep(0.01)  # the poll interval
        assert asyncio.all_tasks() == {asyncio.current_task()}, "the engine's driver task is still pending"
        return tuple(results)

    good, bad = asyncio.run(main())
    assert good == solo(checkpoint, work[0])
    assert isinstance(bad, RequestFailed) and "request 'bad' failed" in str(bad)
    assert_all_pages_free(engine)


@pytest.fixture
def worker(checkpoint: Checkpoint) -> Iterator[tuple[Engine, WorkerServer]]:
    engine = make_engine(checkpoint)
    yield engine, WorkerServer(engine, "w0")


def test_the_worker_answers_internal_naming_the_failed_request(worker: tuple[Engine, WorkerServer]) -> None:
    engine, server = worker
    work = prompts(2, 20, seed=4)
    make_request = engine._make_request

    def poisoned(request_id, prompt_ids, params):  # type: ignore[no-untyped-def]
        request = make_request(request_id, prompt_ids, params)
        if request_id == "bad":
            request.checkers[0].append = lambda token_id: (_ for _ in ()).throw(RuntimeError("boom"))
        return request

    engine._make_request = poisoned  # type: ignore[method-assign]

    async def call(stub: worker_pb2_grpc.WorkerStub, request_id: str, prompt: list[int]) -> grpc.StatusCode:
        request = worker_pb2.WorkerGenerateRequest(request_id=request_id, token_ids=prompt,
                                                   sampling=sampling_options_to_proto(GREEDY))
        try:
            async for _ in stub.Generate(request, timeout=60):
                pass
        except grpc.aio.AioRpcError as error:
            assert "request 'bad' failed: RuntimeError: boom" in (error.details() or "")
            return error.code()
        return grpc.StatusCode.OK

    async def main() -> list[grpc.StatusCode]:
        address = await server.start()
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = worker_pb2_grpc.WorkerStub(channel)
                codes = await asyncio.gather(call(stub, "good", work[0]), call(stub, "bad", work[1]))
                codes.append(await call(stub, "after", work[1]))  # the worker keeps serving
                return codes
        finally:
            await server.stop(1.0)

    assert asyncio.run(main()) == [grpc.StatusCode.OK, grpc.StatusCode.INTERNAL, grpc.StatusCode.OK]


def test_the_engine_seed_makes_unseeded_sampling_reproducible(checkpoint: Checkpoint) -> None:
    params = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    [prompt] = prompts(1, 10, seed=6)

    def tokens(seed: int) -> list[int]:
        engine = make_engine(checkpoint, seed=seed)
        engine.add_request(prompt, params, "r")
        return run_to_completion(engine)["r"].tokens

    assert tokens(1) == tokens(1)
    assert tokens(1) != tokens(2)
