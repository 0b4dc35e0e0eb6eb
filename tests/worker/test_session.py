"""``Worker.Session``: Generate requests multiplexed over one stream, as the router sends them."""

from __future__ import annotations

import grpc
from conditions import until
from test_service import (GREEDY, LONG, PROMPT, RPC_TIMEOUT_S, checkpoint, direct_run,  # noqa: F401
                          make_engine, pages_released, request, run, serving, stream_tokens)

from radixserve.cluster.base.sampling_params import SamplingParams
from radixserve.v1 import worker_pb2, worker_pb2_grpc
from radixserve.worker.models.checkpoint import Checkpoint

OTHER = [(5 * i + 11) % 300 + 5 for i in range(21)]
Answers = dict[str, list[worker_pb2.WorkerSessionResponse]]


def generate(req: worker_pb2.WorkerGenerateRequest) -> worker_pb2.WorkerSessionRequest:
    return worker_pb2.WorkerSessionRequest(generate=req)


async def read_until_ended(call: grpc.aio.StreamStreamCall, request_ids: set[str], answers: Answers) -> None:
    """Reads answers into ``answers`` until each of ``request_ids`` has its last (finished, or an error)."""
    open_ids = set(request_ids)
    while open_ids:
        answer = await call.read()
        assert answer is not grpc.aio.EOF, f"the stream ended before {open_ids} did"
        answers.setdefault(answer.request_id, []).append(answer)
        if answer.error_code or answer.response.finished:
            open_ids.discard(answer.request_id)


def tokens(answers: list[worker_pb2.WorkerSessionResponse]) -> list[int]:
    return stream_tokens([a.response for a in answers])


def test_requests_multiplexed_on_one_stream_get_what_their_own_calls_would(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint)
    other_params = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)

    async def main() -> Answers:
        async with serving(engine) as (_, channel):
            call = worker_pb2_grpc.WorkerStub(channel).Session(timeout=RPC_TIMEOUT_S)
            await call.write(generate(request(PROMPT, request_id="a")))
            await call.write(generate(request(OTHER, other_params, request_id="b")))
            answers: Answers = {}
            await read_until_ended(call, {"a", "b"}, answers)
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF  # the client is done, every request ended: so is the stream
            return answers

    answers = run(main)
    assert tokens(answers["a"]) == direct_run(checkpoint, PROMPT, GREEDY).tokens
    assert tokens(answers["b"]) == direct_run(checkpoint, OTHER, other_params).tokens
    assert not any(a.error_code for a in answers["a"] + answers["b"])


def test_an_abort_message_ends_its_request_and_frees_its_pages_while_the_stream_serves_on(
        checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint)

    async def main() -> Answers:
        async with serving(engine) as (_, channel):
            stub = worker_pb2_grpc.WorkerStub(channel)
            call = stub.Session(timeout=RPC_TIMEOUT_S)
            await call.write(generate(request(PROMPT, LONG, request_id="long")))
            for _ in range(3):
                assert (await call.read()).request_id == "long"
            assert not await pages_released(stub)  # the request holds pages while it runs
            await call.write(worker_pb2.WorkerSessionRequest(abort="long"))
            await until(lambda: pages_released(stub), "the aborted request's pages to be freed")
            answers: Answers = {}
            await call.write(generate(request(PROMPT, request_id="after")))
            await read_until_ended(call, {"after"}, answers)
            call.cancel()
            return answers

    answers = run(main)
    assert tokens(answers["after"]) == direct_run(checkpoint, PROMPT, GREEDY).tokens
    assert "long" in engine.abort_requests and not engine.has_unfinished()
    assert engine.stats.num_generated_tokens < 2 * LONG.max_tokens  # the long one was cut short


def test_a_refused_request_ends_alone_with_its_status_naming_the_field(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint)
    engine.gate.clear()

    async def main() -> Answers:
        async with serving(engine) as (_, channel):
            call = worker_pb2_grpc.WorkerStub(channel).Session(timeout=RPC_TIMEOUT_S)
            await call.write(generate(request(PROMPT, request_id="held")))
            await call.write(generate(request(OTHER, request_id="held")))  # the same id while the first runs
            await call.write(generate(request(OTHER, request_id="")))
            bad = request(OTHER, request_id="bad")
            bad.sampling.max_tokens = 0
            await call.write(generate(bad))
            answers: Answers = {}
            await read_until_ended(call, {"", "bad"}, answers)
            assert len(answers["held"]) == 1  # the refused duplicate's answer; the first is held by the gate
            engine.gate.set()
            await read_until_ended(call, {"held"}, answers)
            call.cancel()
            return answers

    answers = run(main)
    duplicate = answers["held"][0]
    assert duplicate.error_code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert duplicate.error_details.startswith("request_id: ")
    assert answers[""][0].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert answers["bad"][0].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert answers["bad"][0].error_details.startswith("sampling.max_tokens: ")
    assert tokens(answers["held"][1:]) == direct_run(checkpoint, PROMPT, GREEDY).tokens


def test_ending_the_stream_aborts_every_request_on_it(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint)

    async def main() -> None:
        async with serving(engine) as (_, channel):
            stub = worker_pb2_grpc.WorkerStub(channel)
            call = stub.Session(timeout=RPC_TIMEOUT_S)
            await call.write(generate(request(PROMPT, LONG, request_id="x")))
            await call.write(generate(request(OTHER, LONG, request_id="y")))
            seen: set[str] = set()
            while seen != {"x", "y"}:
                seen.add((await call.read()).request_id)
            call.cancel()
            await until(lambda: pages_released(stub), "the stream's requests' pages to be freed")

    run(main)
    assert not engine.has_unfinished()
    assert engine.stats.num_generated_tokens < 2 * LONG.max_tokens
