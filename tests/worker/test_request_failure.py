"""A failure in one request's own work fails that request alone; the engine's seed; no driver task left behind."""

from __future__ import annotations

import asyncio
import threading
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


def make_engine(checkpoint: Checkpoint, seed: int = 0, running: int = 64) -> Engine:
    return Engine(EngineConfig(model="tiny", seed=seed, cache=CacheConfig(page_size=4, num_pages=256),
                               scheduler=SchedulerConfig(max_num_batched_tokens=256, max_running_requests=running)),
                  checkpoint)


class FailingModelStep:
    """Wraps the engine's runner: ``arm()`` makes its next model step raise; ``hold_at(n)`` makes step ``n`` wait
    for ``release`` (bounded) after setting ``entered``, so a test can act between two steps of a driver."""

    def __init__(self, engine: Engine) -> None:
        self._run = engine.runner.run
        self._armed = False
        self._hold_at: int | None = None
        self.num_calls = 0
        self.entered, self.release = threading.Event(), threading.Event()
        engine.runner.run = self  # type: ignore[method-assign]  # fault injection needs the engine's internals

    def arm(self) -> None:
        self._armed = True

    def hold_at(self, call: int) -> None:
        self._hold_at = call

    def __call__(self, batch):  # type: ignore[no-untyped-def]
        self.num_calls += 1
        if self.num_calls == self._hold_at:
            self.entered.set()
            assert self.release.wait(30), "the test never released the held step"
        elif self._armed:
            self._armed = False
            raise RuntimeError("model exploded")
        return self._run(batch)


def poison_stop_checks(engine: Engine, request_id: str, after: int) -> None:
    """Make the request's stop checking raise once it has ``after`` tokens: a fault in its own work."""
    checker = engine._requests[request_id].checkers[0]  # fault injection needs the engine's internals
    append = checker.append

    def failing(token_id: int) -> str | None:
        if checker.seq.num_generated >= after:
            raise RuntimeError("detokenizer exploded")
        return append(token_id)

    checker.append = failing  # type: ignore[method-assign]


def assert_idle(engine: Engine) -> None:
    load = engine.load()
    assert not engine.has_unfinished() and engine._requests == {}
    assert (load.num_running, load.num_waiting, load.num_pending_prefill_tokens) == (0, 0, 0)
    assert_all_pages_free(engine)


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


def test_a_failing_model_step_ends_its_batch_and_still_reports_an_abort_of_that_step(checkpoint: Checkpoint) -> None:
    # Regression: a model step that raised lost the outputs of the aborts it had applied, so the aborted request
    # never reported its end and stayed in flight for good.
    engine = make_engine(checkpoint, running=1)
    work = prompts(3, 20, seed=7)
    for i, prompt in enumerate(work):
        engine.add_request(prompt, GREEDY, f"r{i}")
    runner = FailingModelStep(engine)
    engine.step()  # r0 runs; r1 and r2 wait (one request runs at a time)
    engine.abort("r0")
    runner.arm()
    outputs = {output.request_id: output for output in engine.step()}  # r0 aborted, then r1 admitted, then boom
    assert set(outputs) == {"r0", "r1"}
    assert outputs["r0"].finished and outputs["r0"].error is None
    assert [o.finish_reason for o in outputs["r0"].outputs] == ["abort"]
    assert outputs["r1"].finished and not outputs["r1"].outputs
    assert outputs["r1"].error == "request 'r1' failed: engine step failed: RuntimeError: model exploded"
    assert run_to_completion(engine)["r2"].tokens == solo(checkpoint, work[2])  # not in that step: unharmed
    assert_idle(engine)


def test_the_driver_ends_every_stream_when_a_model_step_fails_with_an_abort(checkpoint: Checkpoint) -> None:
    # Regression: the driver re-queued aborts for every request after a failed step, the drain skipped the one
    # already aborted, and it stayed in flight while the driver stepped with nothing to do.
    engine = make_engine(checkpoint)
    work = prompts(2, 20, seed=8)
    runner = FailingModelStep(engine)
    runner.hold_at(3)

    async def stream(prompt: list[int], request_id: str) -> list[str | None]:
        reasons: list[str | None] = []
        async for output in engine.generate(prompt, GREEDY, request_id):
            reasons += [o.finish_reason for o in output.outputs]
        return reasons

    async def main() -> tuple[list[str | None] | BaseException, ...]:
        streams = asyncio.gather(stream(work[0], "aborted"), stream(work[1], "failed"), return_exceptions=True)
        assert await asyncio.to_thread(runner.entered.wait, 30)
        engine.abort("aborted")  # applied by the next step, whose model step fails
        runner.arm()
        runner.release.set()
        results = await asyncio.wait_for(streams, 30)
        for _ in range(1000):
            if engine._driver is None or engine._driver.done():
                break
            await asyncio.sleep(0.01)  # the poll interval
        assert engine._driver is not None and engine._driver.done(), "the driver is still stepping"
        return tuple(results)

    aborted, failed = asyncio.run(main())
    assert isinstance(aborted, list) and aborted[-1] == "abort"
    assert isinstance(failed, RequestFailed) and "engine step failed: RuntimeError: model exploded" in str(failed)
    assert_idle(engine)


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
