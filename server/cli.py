"""`cats-serve`: flags mirror the Settings fields (and `CATS_*` environment variables)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from pydantic import ValidationError

from cats_serve.server.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cats-serve",
        description="Serve a Llama-family model over an OpenAI-compatible HTTP API with CATS "
        "activation sparsity. Every flag can also be set as CATS_<NAME> in the environment.",
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = field.description or ""
        if name == "thresholds":
            parser.add_argument(flag, nargs="+", type=Path, help=help_text)
        elif field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, help=help_text)
    return parser


def settings_from_args(argv: list[str] | None) -> Settings:
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    return Settings(**given)


def _format_validation(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        lines.append(f"  {where}: {err['msg']}")
    return "invalid settings:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    server = None

    def stop(signum, frame) -> None:
        if server is None:  # still importing torch and friends: nothing to drain yet
            raise SystemExit(0)
        server.should_exit = True

    # Installed first, so a stop requested at any time exits 0. uvicorn swaps in its own
    # handlers while it runs and re-raises the signal that stopped it after its graceful
    # shutdown (which would end the process by SIGTERM or KeyboardInterrupt); this handler gets
    # that re-raise.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    try:
        settings = settings_from_args(argv)
    except ValidationError as exc:
        print(f"cats-serve: {_format_validation(exc)}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uvicorn

    from cats_serve.server.api.app import SHUTDOWN_DRAIN_SECONDS, create_app

    fatal: list[str] = []

    def on_fatal(message: str) -> None:
        fatal.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=SHUTDOWN_DRAIN_SECONDS + 5,
    )
    draining = threading.Event()

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            # Drain the engine now, not after uvicorn's grace period: requests that cannot
            # finish in SHUTDOWN_DRAIN_SECONDS are aborted and end with an error answer, instead
            # of being cut off when uvicorn cancels their tasks at timeout_graceful_shutdown.
            serving = app.state.cats.serving
            if serving is not None and not draining.is_set():
                draining.set()
                drain = threading.Thread(
                    target=serving.engine.shutdown, args=(SHUTDOWN_DRAIN_SECONDS,), daemon=True
                )
                drain.start()

    server = Server(config)
    server.run()
    if fatal:
        print(f"cats-serve: {fatal[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
