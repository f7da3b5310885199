"""`cats-serve`: flags mirror the Settings fields (and `CATS_*` environment variables).

Start-up order: parse the settings, take the listening socket (a busy port fails at once,
exit 2), then serve: `/health` answers 503 (with Retry-After) while the model loads in the
background, one log line per loading phase, and a last line once it is ready. SIGTERM or
Ctrl-C drains running requests for `--shutdown-drain-seconds`; a second signal aborts them at
once, each stream ending with an error event and `[DONE]`.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import socket
import sys
import threading
from pathlib import Path

from pydantic import ValidationError

from cats_serve.server.settings import Settings

log = logging.getLogger("cats_serve.server")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cats-serve",
        description="Serve a Llama-family model over an OpenAI-compatible HTTP API with CATS "
        "activation sparsity. Every flag can also be set as CATS_<NAME> in the environment "
        '(list values as JSON, e.g. CATS_THRESHOLDS=\'["a.json", "b.json"]\').',
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        shown = "none" if default is None else default
        help_text = f"{field.description or ''} (default: {shown}; env CATS_{name.upper()})"
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif name in ("thresholds", "cors_origins"):
            kind = Path if name == "thresholds" else str
            parser.add_argument(flag, nargs="+", type=kind, help=help_text)
        else:
            parser.add_argument(flag, help=help_text)
    parser.add_argument(
        "--clear-cache",
        action="store_true",
        help="delete the converted models under --cache-dir, then exit",
    )
    return parser


def settings_from_args(argv: list[str] | None) -> Settings:
    return settings_from_namespace(build_parser().parse_args(argv))


def settings_from_namespace(args: argparse.Namespace) -> Settings:
    given = {k: v for k, v in vars(args).items() if v is not None and k != "clear_cache"}
    return Settings(**given)


def _format_validation(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        lines.append(f"  {where}: {err['msg']}")
    return "invalid settings:\n" + "\n".join(lines)


def listen(host: str, port: int) -> socket.socket:
    """The bound listening socket; OSError (EADDRINUSE: the port is taken) comes at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # with SO_REUSEADDR a taken port can still bind; listen tells
    except OSError:
        sock.close()
        raise
    return sock


def clear_cache(settings: Settings) -> int:
    models = settings.cache_dir / "models"
    if models.is_dir():
        shutil.rmtree(models)
        print(f"cats-serve: removed {models}")
    else:
        print(f"cats-serve: nothing to remove ({models} does not exist)")
    return 0


def main(argv: list[str] | None = None) -> int:
    server = None

    def stop(signum, frame) -> None:
        if server is None:  # still importing torch and friends: nothing to drain yet
            raise SystemExit(0)
        server.should_exit = True

    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_namespace(args)
    except ValidationError as exc:
        print(f"cats-serve: {_format_validation(exc)}", file=sys.stderr)
        return 2
    if args.clear_cache:
        return clear_cache(settings)
    # Installed before anything slow, so a stop requested at any time exits 0. uvicorn swaps in
    # its own handlers while it runs and re-raises the signal that stopped it after its graceful
    # shutdown (which would end the process by SIGTERM or KeyboardInterrupt); this handler gets
    # that re-raise.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    try:
        sock = listen(settings.host, settings.port)
    except OSError as exc:
        print(
            f"cats-serve: cannot listen on {settings.host}:{settings.port}: {exc.strerror} "
            "(is another server running there? choose another --port)",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uvicorn

    from cats_serve.server.api.app import create_app
    from cats_serve.server.api.connections import header_timeout_protocol

    fatal: list[str] = []

    def on_fatal(message: str) -> None:
        fatal.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}"
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        timeout_keep_alive=settings.timeout_keep_alive,
        timeout_graceful_shutdown=settings.shutdown_drain_seconds + 5,
        http=header_timeout_protocol(settings.header_timeout),
    )
    signals = 0

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # Drain the engine now, not after uvicorn's grace period: requests that cannot
            # finish in time are aborted and end with an error answer, instead of being cut
            # off when uvicorn cancels their tasks. A second signal aborts them at once (the
            # streams still end properly); only a third forces uvicorn out.
            nonlocal signals
            signals += 1
            serving = app.state.cats.serving
            if signals == 1 or signals > 2 or serving is None:
                super().handle_exit(sig, frame)
            if serving is None or signals > 2:
                return
            drain = settings.shutdown_drain_seconds if signals == 1 else 0.0
            log.info(
                "stopping: %s %d running request(s)",
                f"draining for up to {drain:g} s" if drain else "aborting",
                serving.engine.num_running,
            )
            threading.Thread(target=serving.engine.shutdown, args=(drain,), daemon=True).start()

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started and app.state.cats.serving is None:
                log.info("listening on %s; /health answers 503 until the model is loaded", url)

    app.state.cats.url = url
    server = Server(config)
    server.run(sockets=[sock])
    if fatal:
        print(f"cats-serve: {fatal[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
