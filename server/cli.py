"""The `swapserve` command: `swapserve serve`, and the trainer's and RAG's commands."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from server.errors import RequestIdFilter


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app
    from server.config import Settings
    from server.drain import DrainingServer

    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "base_model": args.base_model,
            "quantization": args.quantization,
            "device": args.device,
        }.items()
        if v is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"invalid settings:\n{exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        # the drain (server/drain.py) has already waited for running requests; this only
        # bounds closing the idle connections left after it
        timeout_graceful_shutdown=2,
    )
    DrainingServer(config, app.state.drain).run()
    # The lifespan shutdown has closed the engine, the stores and the job records. What is
    # left is the interpreter's teardown of a loaded model (1.5-3 s on CPU), which writes
    # nothing we need and would push the exit past the shutdown grace.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _keys_create(args: argparse.Namespace) -> int:
    from server.auth import AuthConfigError, add_key_to_file, default_keys_file

    path = args.file or default_keys_file()
    try:
        key = add_key_to_file(path, args.name, [args.scope], args.model, args.collection)
    except AuthConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"created key {args.name!r} ({args.scope}) in {path}; it is shown only once:",
        file=sys.stderr,
    )
    print(key)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swapserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the OpenAI-compatible server")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument(
        "--base-model",
        help="a bundled model (smollm2-135m-instruct, the default, or gemma3-270m) or a local "
        "HF model folder",
    )
    serve.add_argument("--quantization", choices=["nf4", "none"])
    serve.add_argument("--device", help="auto, cpu or cuda")
    serve.add_argument("--log-level", default="INFO")
    serve.set_defaults(func=_serve)
    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(
        dest="action", required=True
    )
    create = keys.add_parser("create", help="create a key; prints it once, stores its hash")
    create.add_argument("--name", required=True, help="shown in logs instead of the key")
    create.add_argument("--scope", required=True, choices=["admin", "inference"])
    create.add_argument("--file", type=Path, help="keys file (default: the server's)")
    create.add_argument("--model", action="append", help="allow only this adapter (repeatable)")
    create.add_argument("--collection", action="append", help="allow only this RAG collection")
    create.set_defaults(func=_keys_create)
    from server.ab.cli import add_parser as add_ab_parser

    add_ab_parser(sub)
    # Imported here, not at the top: rag's module imports numpy/faiss, and the CLI's
    # commands import torch only when they run.
    from rag.cli import register as register_rag

    register_rag(sub)
    from trainer.cli import register as register_train

    register_train(sub)  # swapserve train sft|dpo
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
