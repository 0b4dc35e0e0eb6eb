"""The ``radixserve`` command line: ``generate`` and ``model pull|list``.

Engine code is imported inside the commands that need it: cluster/ does not depend on worker/ at import
time, and ``radixserve model list`` starts without loading torch.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from radixserve.cluster.config import DEFAULT_MODEL, CacheConfig, EngineConfig, SchedulerConfig
from radixserve.cluster.model_store import add_model_commands

if TYPE_CHECKING:
    from radixserve.worker.engine import Engine


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser("generate", help="run the engine in-process on one prompt and stream the answer")
    gen.add_argument("prompt", help="the user message (or raw text with --raw)")
    gen.add_argument("--model", default=DEFAULT_MODEL, help="model-store name or path to a .gguf / HF directory")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("--system", default=None, help="system message for the chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--page-size", type=int, default=CacheConfig.page_size)
    gen.add_argument("--kv-memory-gib", type=float, default=CacheConfig.memory_gib)
    gen.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    """``radixserve generate PROMPT``: load, stream the completion to stdout, report timings to stderr."""
    from radixserve.worker.engine import Engine
    from radixserve.cluster.sampling_params import SamplingParams

    try:
        config = EngineConfig(model=args.model, cache=CacheConfig(page_size=args.page_size,
                                                                  memory_gib=args.kv_memory_gib),
                              scheduler=SchedulerConfig())
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed)
        print(f"loading {args.model} (a first run also builds the attention kernel, about 30 s) ...",
              file=sys.stderr, flush=True)
        started = time.monotonic()
        engine = Engine.from_config(config)
        print(f"loaded in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
        prompt = args.prompt if args.raw else _chat_prompt(engine, args.system, args.prompt)
        started = time.monotonic()
        engine.add_request(prompt, params)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    num_tokens = 0
    while engine.has_unfinished():
        for output in engine.step():
            for completion in output.outputs:
                num_tokens += len(completion.token_ids)
                sys.stdout.write(completion.text)
                sys.stdout.flush()
    elapsed = time.monotonic() - started
    print(f"\n[{num_tokens} tokens in {elapsed:.2f} s, {num_tokens / elapsed:.1f} tok/s]", file=sys.stderr)
    return 0


def _chat_prompt(engine: Engine, system: str | None, user: str) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radixserve", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_generate(subparsers)
    add_model_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
