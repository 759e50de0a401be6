"""``llmppl serve``: an OpenAI-compatible HTTP server over ``engine.run_batch`` (FastAPI + uvicorn).

Needs the optional extra ``llmppl[serve]``.  ``create_app(lm, ServerConfig(...))`` builds the
app; ``serve(lm, config, host, port)`` runs it under uvicorn.  Requests that arrive while a batch
runs are sampled together by the next ``run_batch``; every response carries an ``llmppl``
object with the sampler's diagnostics (log evidence, ESS, resampling count, wall time).
"""

from __future__ import annotations

from typing import Any

from .config import ServerConfig

__all__ = ["ServerConfig", "create_app", "serve"]


def create_app(lm: Any, config: ServerConfig | None = None, potential: Any = None) -> Any:
    """The FastAPI app (see :func:`llmppl.server.app.create_app`)."""
    try:
        from .app import create_app as _create
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"llmppl serve needs FastAPI and uvicorn ({exc}); install them with: pip install 'llmppl[serve]'"
        ) from exc
    return _create(lm, config, potential)


def serve(lm: Any, config: ServerConfig | None = None, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", potential: Any = None, exit_when_stopped: bool = False) -> None:
    """Run the app under uvicorn until interrupted (one worker process: the model is loaded once).

    At the first Ctrl-C / SIGTERM every queued and running request is answered with a 503 JSON
    error (``server_shutting_down``).  A batch still running then finishes in its thread, and
    ``serve`` returns when it has; with ``exit_when_stopped`` (``llmppl serve``) the process exits
    at once instead (status 0), abandoning that batch.
    """
    import os
    import sys

    app = create_app(lm, config, potential)
    try:
        import uvicorn
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("llmppl serve needs uvicorn; install it with: pip install 'llmppl[serve]'") from exc
    batcher = app.state.batcher

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # at the first Ctrl-C / SIGTERM, answer every queued and running request with a 503
            # JSON error at once (rather than cancelling them after the graceful timeout)
            if batcher.loop is not None and not batcher.loop.is_closed():
                batcher.loop.call_soon_threadsafe(batcher.shutdown)
            super().handle_exit(sig, frame)

    try:
        Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)).run()
    finally:
        if batcher.busy():
            if exit_when_stopped:   # torch running in a thread while the interpreter finalises aborts it
                print("llmppl serve: stopped (the batch in progress was abandoned)", file=sys.stderr)
                sys.stderr.flush()
                sys.stdout.flush()
                os._exit(0)
            batcher.join()
