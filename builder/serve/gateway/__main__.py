"""`python -m builder.serve.gateway --triton 127.0.0.1:PORT --repository DIR --state-dir DIR --port N [--public]`

Runs the gateway with uvicorn on loopback (nginx is the public front), log level warning and no
access log, so keys and prompts never reach a log file.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvicorn

from builder.serve.gateway.app import create_app
from builder.serve.gateway.config import DEFAULT_MAX_BODY_BYTES, GatewayConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m builder.serve.gateway", description=__doc__.splitlines()[0])
    p.add_argument("--triton", required=True, help="Triton's HTTP address, HOST:PORT")
    p.add_argument("--repository", required=True, type=Path, help="model repository (its manifest.json)")
    p.add_argument("--state-dir", type=Path, help="directory of api-keys.json (required unless --public)")
    p.add_argument("--port", required=True, type=int, help="port to listen on")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on [127.0.0.1]")
    p.add_argument("--public", action="store_true", help="no API keys: anyone who reaches the port may call")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="413 above this [32 MiB]")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for Triton per request [600]")
    p.add_argument("--default-max-tokens", type=int, help="cap for chat requests without max_tokens "
                                                          "[none: the room left in the context]")
    p.add_argument("--idle-timeout", type=float, default=0.0,
                   help="unload a deployment after this many seconds without requests [0: never]")
    p.add_argument("--idle-timeout-for", action="append", default=[], metavar="NAME=SECONDS",
                   help="a deployment's own idle timeout (NAME or NAME:PRECISION); repeatable")
    p.add_argument("--memory-budget", type=int, default=0, metavar="BYTES",
                   help="memory the loaded deployments may hold; least recently used idle ones make room [0: none]")
    p.add_argument("--triton-grpc", default="", help="Triton's gRPC address, HOST:PORT (for --grpc-port)")
    p.add_argument("--grpc-port", type=int, default=0,
                   help="serve a gRPC relay to --triton-grpc here that wakes the deployment a call names [0: none]")
    p.add_argument("--max-queue", type=int, default=None, metavar="N",
                   help="requests a deployment queues past its max_batch_size before answering 429 "
                        "[2 x max_batch_size; -1: no bound]")
    p.add_argument("--max-queue-for", action="append", default=[], metavar="NAME=N",
                   help="a deployment's own queue (NAME or NAME:PRECISION); repeatable")
    p.add_argument("--hold-limit", type=float, default=120.0,
                   help="longest a request waits for its deployment to load before a 503 [120]")
    p.add_argument("--no-metrics", dest="metrics", action="store_false",
                   help="record no gateway series (GET /metrics answers an empty body)")
    args = p.parse_args(argv)
    try:
        args.idle_timeouts = {k: float(v) for k, _, v in (s.partition("=") for s in args.idle_timeout_for)}
    except ValueError:
        p.error("--idle-timeout-for takes NAME=SECONDS")
    try:
        args.max_queues = {k: int(v) for k, _, v in (s.partition("=") for s in args.max_queue_for)}
    except ValueError:
        p.error("--max-queue-for takes NAME=N")
    if args.grpc_port and not args.triton_grpc:
        p.error("--grpc-port needs --triton-grpc (Triton's gRPC address)")
    if not args.public and args.state_dir is None:
        p.error("--state-dir is required unless --public (it holds api-keys.json)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s gateway %(levelname)s %(message)s")
    config = GatewayConfig(triton_url=args.triton, repository=args.repository, state_dir=args.state_dir,
                           public=args.public, max_body_bytes=args.max_body_bytes, request_timeout=args.timeout,
                           default_max_tokens=args.default_max_tokens, idle_timeout=args.idle_timeout,
                           idle_timeouts=args.idle_timeouts, hold_limit=args.hold_limit,
                           memory_budget=args.memory_budget, max_queue=args.max_queue, max_queues=args.max_queues,
                           triton_grpc=args.triton_grpc,
                           grpc_port=args.grpc_port, metrics=args.metrics)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
