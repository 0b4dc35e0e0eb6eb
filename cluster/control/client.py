"""The user side of a cluster: a synchronous gRPC client and the ``generate`` and ``status`` commands."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import NamedTuple

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from radixserve.cluster.control.discovery import read_targets
from radixserve.cluster.control.top import format_frame, read_frame, targets_path
from radixserve.v1 import api_pb2, api_pb2_grpc, types_pb2

DEFAULT_TARGET = "127.0.0.1:50051"
TARGET_ENV = "RADIXSERVE_TARGET"
API_KEY_ENV = "RADIXSERVE_API_KEY"
CLUSTER_KEY_ENV = "RADIXSERVE_CLUSTER_KEY"
CA_FILE_ENV = "RADIXSERVE_CA_FILE"
_UNAVAILABLE_HINT = "is the cluster up? start it with `radixserve up`"


def default_target() -> str:
    """The router addresses: ``$RADIXSERVE_TARGET`` when set, else those of the cluster ``radixserve up`` runs
    here, else ``127.0.0.1:50051``."""
    from radixserve.cluster.control.launcher import ClusterState

    state = ClusterState.load()
    running = ",".join(state.router_addresses or (state.router_address,)) if state is not None else None
    return os.environ.get(TARGET_ENV) or running or DEFAULT_TARGET


def channel_target(targets: str | Sequence[str]) -> str:
    """The gRPC target of one router address, or of several (``"a:1,b:2"`` or a list): gRPC's static
    ``ipv4:`` / ``ipv6:`` address list, each host resolved now. ValueError names a malformed address."""
    addresses = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    if not addresses:
        raise ValueError("target: no router address given")
    if len(addresses) == 1:
        return addresses[0]
    resolved = [_resolve(address) for address in addresses]
    families = {family for family, _ in resolved}
    if len(families) > 1:
        raise ValueError("target: mixes IPv4 and IPv6 router addresses")
    return f"{families.pop()}:" + ",".join(address for _, address in resolved)


def _resolve(address: str) -> tuple[str, str]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"target: {address!r} is not host:port")
    host = host.strip("[]")
    try:
        family, *_, sockaddr = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as error:
        raise ValueError(f"target: cannot resolve {host!r}: {error}") from None
    if family == socket.AF_INET6:
        return "ipv6", f"[{sockaddr[0]}]:{port}"
    return "ipv4", f"{sockaddr[0]}:{port}"


class ClusterClient:
    """A blocking client of a cluster's routers (the ``radixserve.v1.Generation`` service).

    ``target`` is one router address or several (``"host:port,host:port"`` or a list): calls then take turns
    among them (gRPC's ``round_robin``) and skip a router that does not answer, so one router going away costs
    only the calls it had in flight. ``timeout_s`` is the deadline of every call (None: none). ``ca_file`` (PEM)
    makes it speak TLS, trusting that authority; ``api_key`` goes with every call as ``authorization: Bearer
    <key>``. Failed calls raise ``grpc.RpcError``; invalid arguments raise ValueError naming them. Close it, or
    use it as a context manager.
    """

    def __init__(self, target: str | Sequence[str] = DEFAULT_TARGET, timeout_s: float | None = None,
                 ca_file: str | None = None, api_key: str | None = None) -> None:
        self.target = target if isinstance(target, str) else ",".join(target)
        self._timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        address = channel_target(target)
        options = [("grpc.lb_policy_name", "round_robin")]
        if ca_file is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            with open(ca_file, "rb") as file:
                roots = file.read()
            self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=roots),
                                                options=options)
        self._stub = api_pb2_grpc.GenerationStub(self._channel)

    def generate(self, prompt: str | None = None, *, chat: Sequence[dict[str, str]] | None = None,
                 token_ids: Sequence[int] | None = None, sampling: types_pb2.SamplingOptions | None = None,
                 request_id: str = "") -> Iterator[api_pb2.GenerateResponse]:
        """Stream the responses to one request as the router sends them.

        Give exactly one of ``prompt`` (raw text), ``chat`` (``{"role": ..., "content": ...}`` messages,
        rendered with the model's chat template) or ``token_ids``. The call starts on the first ``next``;
        closing the iterator early cancels it, which aborts the request.
        """
        request = _generate_request(prompt, chat, token_ids, sampling, request_id)
        return self._stream(request)

    def complete(self, prompt: str | None = None, *, chat: Sequence[dict[str, str]] | None = None,
                 token_ids: Sequence[int] | None = None, sampling: types_pb2.SamplingOptions | None = None,
                 request_id: str = "") -> api_pb2.CompleteResponse:
        """The whole answer to one request, once it has finished (arguments as for ``generate``)."""
        request = _generate_request(prompt, chat, token_ids, sampling, request_id)
        return self._stub.Complete(request, timeout=self._timeout_s, metadata=self._metadata)

    def list_workers(self) -> api_pb2.ListWorkersResponse:
        """The router's workers, their state and load."""
        return self._stub.ListWorkers(api_pb2.ListWorkersRequest(), timeout=self._timeout_s, metadata=self._metadata)

    def wait_ready(self, timeout_s: float, poll_interval_s: float = 0.1) -> None:
        """Return once the router's overall health (gRPC health service, service ``""``) is SERVING; raise
        TimeoutError when it is not after ``timeout_s``."""
        health = health_pb2_grpc.HealthStub(self._channel)
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(), timeout=min(remaining, 1.0))
            except grpc.RpcError as error:
                last = error.code().name
            else:
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            time.sleep(min(poll_interval_s, max(deadline - time.monotonic(), 0)))
        raise TimeoutError(f"{self.target}: not serving after {timeout_s} s (last: {last})")

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> ClusterClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def _stream(self, request: api_pb2.GenerateRequest) -> Iterator[api_pb2.GenerateResponse]:
        call = self._stub.Generate(request, timeout=self._timeout_s, metadata=self._metadata)
        try:
            yield from call
        finally:
            call.cancel()  # no-op once the stream has ended


def _generate_request(prompt: str | None, chat: Sequence[dict[str, str]] | None, token_ids: Sequence[int] | None,
                      sampling: types_pb2.SamplingOptions | None, request_id: str) -> api_pb2.GenerateRequest:
    given = [name for name, value in (("prompt", prompt), ("chat", chat), ("token_ids", token_ids))
             if value is not None]
    if len(given) != 1:
        raise ValueError(f"prompt: give exactly one of prompt, chat, token_ids (got {', '.join(given) or 'none'})")
    request = api_pb2.GenerateRequest(request_id=request_id, sampling=sampling)
    if prompt is not None:
        request.text = prompt
    elif chat is not None:
        request.chat.CopyFrom(api_pb2.Chat(messages=[_chat_message(i, message) for i, message in enumerate(chat)]))
    else:
        request.token_ids.CopyFrom(_token_ids(token_ids or ()))
    return request


def _token_ids(token_ids: Sequence[int]) -> api_pb2.TokenIds:
    try:
        return api_pb2.TokenIds(ids=token_ids)
    except (TypeError, ValueError) as error:
        raise ValueError(f"token_ids: must be ints in [0, 2**32), got {list(token_ids)!r} ({error})") from None


def _chat_message(index: int, message: dict[str, str]) -> api_pb2.ChatMessage:
    if not isinstance(message, dict) or set(message) != {"role", "content"}:
        raise ValueError(f"chat[{index}]: must be a dict with exactly 'role' and 'content', got {message!r}")
    for key, value in message.items():
        if not isinstance(value, str):
            raise ValueError(f"chat[{index}].{key}: must be a string, got {value!r}")
    return api_pb2.ChatMessage(role=message["role"], content=message["content"])


def add_client_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``generate PROMPT`` and ``status``; each sets ``func(args) -> int`` (an exit code)."""
    gen = subparsers.add_parser("generate", help="send one prompt to the cluster and stream the answer")
    gen.add_argument("prompt", help="the user message (or raw text with --raw)")
    _add_target(gen)
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("--system", default=None, help="system message for the chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--n", type=int, default=None, help="independent samples (printed one after another)")
    gen.set_defaults(func=run_generate)
    status = subparsers.add_parser("status", help="show the cluster's workers, their load and cache")
    _add_target(status)
    status.set_defaults(func=run_status)


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=None,
                        help=f"router address, or several comma-separated (default: ${TARGET_ENV}, else the "
                             f"routers of the cluster `radixserve up` runs here, else {DEFAULT_TARGET})")
    parser.add_argument("--ca-file", default=os.environ.get(CA_FILE_ENV) or None,
                        help=f"speak TLS, trusting this CA certificate (PEM; default: ${CA_FILE_ENV})")
    parser.add_argument("--api-key", default=None, help=f"API key (default: ${API_KEY_ENV}; prefer the variable, "
                                                        "which stays out of the process list)")


def _client(args: argparse.Namespace, admin: bool = False) -> ClusterClient:
    """A client of ``args.target`` with ``--api-key``, else (``admin`` calls) the cluster key from
    ``$RADIXSERVE_CLUSTER_KEY`` or the one ``up`` generated here, else ``$RADIXSERVE_API_KEY``."""
    if args.target is None:
        args.target = default_target()
    key = args.api_key or (_cluster_key() if admin else None) or os.environ.get(API_KEY_ENV)
    return ClusterClient(args.target, ca_file=args.ca_file, api_key=key)


def _cluster_key() -> str | None:
    from radixserve.cluster.control.launcher import cluster_key_path

    try:
        return os.environ.get(CLUSTER_KEY_ENV) or cluster_key_path().read_text().strip() or None
    except OSError:
        return None


def run_generate(args: argparse.Namespace) -> int:
    """``radixserve generate PROMPT``: stream sample 0 to stdout as it arrives (further samples follow it),
    then a summary line to stderr."""
    sampling = types_pb2.SamplingOptions(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                         top_k=args.top_k, seed=args.seed, n=args.n)
    chat = None if args.raw else _chat(args.system, args.prompt)
    started = time.monotonic()
    try:
        with _client(args) as client:
            last = _print_samples(client.generate(args.prompt if args.raw else None, chat=chat, sampling=sampling))
    except grpc.RpcError as error:
        return _report(error, args.target)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(_summary(last, time.monotonic() - started), file=sys.stderr)
    return 0


def _chat(system: str | None, user: str) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def _print_samples(responses: Iterator[api_pb2.GenerateResponse]) -> api_pb2.GenerateResponse | None:
    """Write sample 0's text to stdout as it arrives and the other samples after it; return the last response."""
    later: dict[int, list[str]] = {}
    last = None
    for last in responses:
        for chunk in last.choices:
            if chunk.index == 0:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            else:
                later.setdefault(chunk.index, []).append(chunk.text)
    for index in sorted(later):
        sys.stdout.write(f"\n--- sample {index} ---\n{''.join(later[index])}")
    sys.stdout.write("\n")
    return last


def _summary(last: api_pb2.GenerateResponse | None, elapsed_s: float) -> str:
    usage = last.usage if last is not None else api_pb2.Usage()
    worker = last.worker_id if last is not None and last.worker_id else "?"
    rate = usage.completion_tokens / elapsed_s if elapsed_s > 0 else 0.0
    return (f"[{usage.completion_tokens} tokens, {usage.cached_tokens}/{usage.prompt_tokens} prompt tokens cached, "
            f"worker {worker}, {elapsed_s:.2f} s, {rate:.1f} tok/s]")


def run_status(args: argparse.Namespace) -> int:
    """``radixserve status``: print one table row per worker behind the router."""
    try:
        with _client(args, admin=True) as client:
            response = client.list_workers()
    except grpc.RpcError as error:
        return _report(error, args.target)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_status(response))
    path = targets_path(None)
    if path is not None and path.exists():
        print(f"\nfrom /metrics (as Prometheus sees it; live view: radixserve top):\n"
              f"{format_frame(read_frame(read_targets(path)), None)}")
    return 0


def _report(error: grpc.RpcError, target: str) -> int:
    """Print ``error: STATUS: details`` (and a hint when the router is unreachable) to stderr; return 1."""
    code = error.code()
    print(f"error: {code.name}: {error.details()}", file=sys.stderr)
    if code == grpc.StatusCode.UNAVAILABLE:
        print(f"{target}: {_UNAVAILABLE_HINT}", file=sys.stderr)
    return 1


class _Column(NamedTuple):
    header: str
    cell: Callable[[api_pb2.WorkerStatus], str]
    left: bool = False  # text columns align left, numbers right


def _percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _kv_pages(worker: api_pb2.WorkerStatus) -> str:
    used, total = worker.load.num_pages_used, worker.load.num_pages_used + worker.load.num_pages_free
    return f"{used}/{total} ({_percent(used, total)})"


_COLUMNS = (
    _Column("WORKER", lambda w: w.worker_id, left=True),
    _Column("STATE", lambda w: w.state, left=True),
    _Column("ADDRESS", lambda w: w.address, left=True),
    _Column("HTTP", lambda w: w.http_address or "-", left=True),
    _Column("RUNNING", lambda w: str(w.load.num_running)),
    _Column("WAITING", lambda w: str(w.load.num_waiting)),
    _Column("KV PAGES", _kv_pages),
    _Column("HIT", lambda w: _percent(w.load.hit_ratio, 1)),
    _Column("ROUTED", lambda w: str(w.num_routed)),
    _Column("IN FLIGHT", lambda w: str(w.num_in_flight)),
    _Column("INDEXED", lambda w: str(w.num_indexed_pages)),
    _Column("EVENTS", lambda w: "live" if w.events_live else "stale", left=True),
)


def format_status(response: api_pb2.ListWorkersResponse) -> str:
    """The router's policy, then a table with a header and one row per worker (columns as in ``_COLUMNS``).

    HTTP is the worker's OpenAI-compatible HTTP API ("-": none). KV PAGES is used/total (used + free) with the
    used percentage; HIT is the prefix-cache hit ratio in percent.
    """
    title = f"policy: {response.policy or '?'}, {len(response.workers)} worker(s)"
    rows = [[column.header for column in _COLUMNS]]
    rows += [[column.cell(worker) for column in _COLUMNS] for worker in response.workers]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(width) if column.left else cell.rjust(width)
                       for cell, width, column in zip(row, widths, _COLUMNS)).rstrip() for row in rows]
    return "\n".join([title, *lines])
