"""llama.cpp as a benchmark peer: one long-lived process that times requests it reads from stdin.

Run only with the benchmark-only environment's python (bench/peers/setup_llama_cpp.sh builds it); the project's
own venv never imports llama_cpp. bench/bench_engine.py starts it as

    bench/.venv-llama/bin/python bench/peers/llama_cpp_runner.py MODEL.gguf --threads N

Protocol: one JSON object per line on stdin, one reply per line on stdout, in order. The process exits when stdin
closes. A request that fails gets {"error": "..."} and the process keeps serving. Everything else the process or
llama.cpp prints goes to stderr (stdout is the protocol's alone).

    {"op": "info"}
        -> {"llama_cpp": version, "build_flags": the CMAKE_ARGS line or null, "system_info": ggml's feature line,
            "n_threads": N, "n_vocab": V, "context": how every context is configured}
    {"op": "decode", "prompts": [[token, ...], ...], "decode_tokens": D}
        -> {"tok_s": len(prompts) * D / seconds, "seconds": seconds}
        One sequence per prompt in a fresh KV cache. Each prompt is evaluated (untimed) and its first token taken by
        argmax; then D timed steps, each ONE llama_decode call carrying the next token of every sequence, followed
        by the argmax of each sequence's logits.
    {"op": "prefill", "tokens": [token, ...]}
        -> {"seconds": seconds}
        One llama_decode call over the whole prompt (n_batch = its length; llama.cpp splits it into physical
        batches of n_ubatch = 512, its default, which beat one 2,048-token ubatch: ~160 vs ~140 tok/s on 2 cores)
        in a fresh KV cache, plus the argmax of the last position's logits (the first token), as a time to first
        token.

Every context has n_threads = n_threads_batch = N, n_seq_max = the number of sequences, a KV cache of its own per
sequence (kv_unified false) of the positions the request needs rounded up to 256 (llama.cpp's padding), and
otherwise llama.cpp's defaults (f16 KV cache, flash attention "auto").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import llama_cpp
import numpy as np

N_UBATCH = llama_cpp.llama_context_default_params().n_ubatch
CONTEXT = {"n_batch": "the tokens of the largest llama_decode call", "n_ubatch": f"min(n_batch, {N_UBATCH})",
           "kv_unified": False, "flash_attn": "auto", "kv_cache": "f16"}
CTX_PAD = 256  # llama.cpp pads each sequence's context to a multiple of this


@dataclass(frozen=True)
class Shape:
    """What a context must hold: ``n_seq`` sequences of up to ``positions`` positions each, and up to
    ``n_batch`` tokens per llama_decode call."""

    n_seq: int
    positions: int
    n_batch: int

    @property
    def n_ctx(self) -> int:
        return self.n_seq * -(-self.positions // CTX_PAD) * CTX_PAD


class Batch:
    """A llama_batch of room for ``capacity`` tokens, each in exactly one sequence."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.raw = llama_cpp.llama_batch_init(capacity, 0, 1)

    def fill(self, entries: Iterable[tuple[int, int, int, bool]]) -> None:
        """Replace the contents with ``(token, position, sequence, wants_logits)`` entries."""
        raw, n = self.raw, 0
        for token, pos, seq, wants_logits in entries:
            if n == self.capacity:
                raise ValueError(f"batch holds at most {self.capacity} tokens")
            raw.token[n], raw.pos[n], raw.n_seq_id[n] = token, pos, 1
            raw.seq_id[n][0] = seq
            raw.logits[n] = wants_logits
            n += 1
        raw.n_tokens = n

    def free(self) -> None:
        llama_cpp.llama_batch_free(self.raw)


class Runner:
    """The model loaded once, and one context (with its batch) kept until a request needs another shape."""

    def __init__(self, model_path: Path, threads: int):
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(),
                                                          llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.threads = threads
        self.shape: Shape | None = None
        self.ctx: Any = None
        self.batch: Batch | None = None

    def context(self, shape: Shape) -> tuple[Any, Batch]:
        """A context of ``shape`` with an empty KV cache, and its batch."""
        if shape != self.shape:
            self._free_context()
            params = llama_cpp.llama_context_default_params()
            params.n_ctx, params.n_seq_max = shape.n_ctx, shape.n_seq
            params.n_batch, params.n_ubatch = shape.n_batch, min(shape.n_batch, N_UBATCH)
            params.n_threads = params.n_threads_batch = self.threads
            params.kv_unified = CONTEXT["kv_unified"]
            self.ctx = llama_cpp.llama_init_from_model(self.model, params)
            if not self.ctx:
                raise RuntimeError(f"llama.cpp could not create a context for {shape}")
            self.shape, self.batch = shape, Batch(shape.n_batch)
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        return self.ctx, self.batch

    def info(self) -> dict[str, Any]:
        """The "info" reply (see the module docstring)."""
        flags = Path(sys.prefix, "BUILD_FLAGS")
        return {"llama_cpp": llama_cpp.__version__,
                "build_flags": flags.read_text().strip() if flags.exists() else None,
                "system_info": llama_cpp.llama_print_system_info().decode().strip(),
                "n_threads": self.threads, "n_vocab": self.n_vocab, "context": CONTEXT}

    def decode(self, prompts: list[list[int]], decode_tokens: int) -> dict[str, float]:
        """The "decode" reply: one sequence per prompt, only the decode steps timed (see the module docstring)."""
        longest = max(len(prompt) for prompt in prompts)
        shape = Shape(n_seq=len(prompts), positions=longest + decode_tokens, n_batch=max(longest, len(prompts)))
        ctx, batch = self.context(shape)
        tokens = [self._evaluate(ctx, batch, seq, prompt) for seq, prompt in enumerate(prompts)]
        started = time.perf_counter()
        for step in range(decode_tokens):
            batch.fill((token, len(prompts[seq]) + step, seq, True) for seq, token in enumerate(tokens))
            _decode(ctx, batch)
            tokens = [self._argmax(ctx, i) for i in range(len(prompts))]
        seconds = time.perf_counter() - started
        return {"tok_s": len(prompts) * decode_tokens / seconds, "seconds": seconds}

    def prefill(self, tokens: list[int]) -> dict[str, float]:
        """The "prefill" reply: one llama_decode call over ``tokens`` timed (see the module docstring)."""
        ctx, batch = self.context(Shape(n_seq=1, positions=len(tokens), n_batch=len(tokens)))
        batch.fill((token, pos, 0, pos == len(tokens) - 1) for pos, token in enumerate(tokens))
        started = time.perf_counter()
        _decode(ctx, batch)
        self._argmax(ctx, -1)
        return {"seconds": time.perf_counter() - started}

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """The reply to one request; raises on an unknown op or a failure."""
        op = request.get("op")
        if op == "info":
            return self.info()
        if op == "decode":
            return self.decode(request["prompts"], request["decode_tokens"])
        if op == "prefill":
            return self.prefill(request["tokens"])
        raise ValueError(f"unknown op {op!r}")

    def close(self) -> None:
        self._free_context()
        llama_cpp.llama_model_free(self.model)

    def _evaluate(self, ctx: Any, batch: Batch, seq: int, prompt: list[int]) -> int:
        """Evaluate ``prompt`` as sequence ``seq`` from position 0; its greedy next token."""
        batch.fill((token, pos, seq, pos == len(prompt) - 1) for pos, token in enumerate(prompt))
        _decode(ctx, batch)
        return self._argmax(ctx, -1)

    def _argmax(self, ctx: Any, i: int) -> int:
        """The greedy token from the logits of the ``i``-th output of the last llama_decode call (-1: the last)."""
        logits = llama_cpp.llama_get_logits_ith(ctx, i)
        if not logits:
            raise RuntimeError(f"llama.cpp has no logits for output {i}")
        return int(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())

    def _free_context(self) -> None:
        if self.ctx is not None:
            self.batch.free()
            llama_cpp.llama_free(self.ctx)
        self.shape, self.ctx, self.batch = None, None, None


def _decode(ctx: Any, batch: Batch) -> None:
    """One llama_decode call; raises on any nonzero status (1 means the KV cache had no room)."""
    status = llama_cpp.llama_decode(ctx, batch.raw)
    if status != 0:
        raise RuntimeError(f"llama_decode returned {status}")


def serve(runner: Runner, requests: TextIO, replies: TextIO) -> None:
    """Answer each request line with one reply line until ``requests`` ends."""
    for line in requests:
        if not line.strip():
            continue
        try:
            reply = runner.handle(json.loads(line))
        except Exception as exc:  # noqa: BLE001 - any failure is the reply; the benchmark decides what to do
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="the GGUF file")
    parser.add_argument("--threads", type=int, required=True, help="n_threads and n_threads_batch")
    args = parser.parse_args(argv)
    # The protocol keeps the real stdout; anything else writing to fd 1 (C code included) lands on stderr.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's own log: errors only
    runner = Runner(args.model, args.threads)
    try:
        serve(runner, sys.stdin, replies)
    finally:
        runner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
