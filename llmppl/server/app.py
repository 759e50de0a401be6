"""The FastAPI application: OpenAI-compatible endpoints over ``engine.run_batch``.

``create_app(lm, config)`` serves one LM:

* ``POST /v1/chat/completions`` and ``POST /v1/completions``: the standard fields plus the
  sampler's options (``method``, ``alpha``, ``particles``, ``resampling``, ``ess_threshold``,
  ``block_size``, ``n_mcmc``; the OpenAI client's ``extra_body``), the server's flags being the
  defaults.  The response is the OpenAI body plus an ``llmppl`` object (log evidence, ESS,
  resampling count, wall time, the batch the request ran in).
* ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health`` (status and counters; no auth).

Requests are validated (and their prompts tokenised and checked against the context) before
they are queued; the :class:`~llmppl.server.batcher.Batcher` runs queued requests together.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..methods import METHODS
from ..options import RESAMPLING_NAMES
from . import responses
from .batcher import Batcher, Job, QueueFull, RunSettings, ShuttingDown
from .config import ServerConfig
from .errors import (
    APIError,
    bad_request,
    error_body,
    install_handlers,
    validation_error,
)
from .schemas import ChatCompletionRequest, CompletionRequest, constraint_spec, unsupported_fields


# ---------------------------------------------------------------- middleware
class Guard:
    """Pure ASGI middleware: API key (every path but ``/health``) and request body size.

    The key is checked before the body is read; the body is read up to ``max_body_bytes`` and
    replayed to the app (a larger one is a 413 whatever its ``Content-Length`` says).
    """

    def __init__(self, app: ASGIApp, config: ServerConfig) -> None:
        self.app = app
        self.config = config

    async def _send_error(self, send: Send, status: int, message: str, code: str,
                          headers: list[tuple[bytes, bytes]] = ()) -> None:
        body = JSONResponse(error_body(status, message, code=code)).body
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *headers]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        key = self.config.api_key
        if key is not None and scope.get("path") != "/health":
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
                msg = ("missing API key: send 'Authorization: Bearer <key>'" if not auth
                       else "incorrect API key provided")
                await self._send_error(send, 401, msg, "invalid_api_key",
                                       [(b"www-authenticate", b"Bearer")])
                return
        limit = self.config.max_body_bytes
        length = headers.get(b"content-length")
        too_big = f"request body larger than the server's limit of {limit} bytes"
        if length is not None and length.isdigit() and int(length) > limit:
            await self._send_error(send, 413, too_big, "request_too_large")
            return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._send_error(send, 413, too_big, "request_too_large")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then wait for the disconnect, as the app expects

        await self.app(scope, replay, send)


#: seconds between two progress events of a streamed request while its batch runs
PROGRESS_EVERY_S = 1.0


# ---------------------------------------------------------------- request -> job
async def _parse(request: Request, model: type[BaseModel]) -> Any:
    """The body as ``model``: JSON whatever the Content-Type (``curl -d`` sends a form type)."""
    raw = await request.body()
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}", None, "invalid_json") from None
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


def _settings(body: ChatCompletionRequest | CompletionRequest, config: ServerConfig,
              max_tokens: int) -> RunSettings:
    """The run's settings: the request's llmppl fields over the server's defaults, checked."""
    method = body.method if body.method is not None else config.method
    if method not in METHODS:
        raise bad_request(f"unknown method {method!r}; choose from {', '.join(sorted(METHODS))}", "method")
    m = METHODS[method]
    fields = ("alpha", "particles", "resampling", "ess_threshold", "block_size", "n_mcmc")
    given = {f: getattr(body, f) for f in fields if getattr(body, f) is not None}
    for f in given:
        if f not in m.options:
            reads = ", ".join(m.options) or "none of them"
            raise bad_request(f"{f} does not apply to method {method!r} (it reads: {reads})", f)
    if "alpha" in given:
        given["alpha"] = float(given["alpha"])
        if not (math.isfinite(given["alpha"]) and given["alpha"] > 0):
            raise bad_request(f"alpha must be finite and > 0, got {given['alpha']!r}", "alpha")
    options = config.method_options(max_new_tokens=max_tokens, **given)
    if options.particles > config.max_particles:
        raise bad_request(f"particles={options.particles} exceeds the server's limit of {config.max_particles}",
                          "particles")
    if options.resampling not in RESAMPLING_NAMES:
        raise bad_request(f"unknown resampling {options.resampling!r}; choose from "
                          f"{', '.join(sorted(RESAMPLING_NAMES))}", "resampling")
    if options.n_mcmc > config.max_n_mcmc:
        raise bad_request(f"n_mcmc={options.n_mcmc} exceeds the server's limit of {config.max_n_mcmc}", "n_mcmc")
    samples = 1 if method == "greedy" else options.particles
    if body.n > samples:
        raise bad_request(f"n={body.n} exceeds the {samples} sample(s) method {method!r} returns"
                          + ("" if method == "greedy" else " (raise particles)"), "n")
    truncation = config.truncation if m.sharpened else "keep"
    return RunSettings(method, options, max_tokens, truncation)


def _max_tokens(body: Any, config: ServerConfig) -> int:
    a = getattr(body, "max_tokens", None)
    b = getattr(body, "max_completion_tokens", None)
    if a is not None and b is not None and a != b:
        raise bad_request(f"max_tokens={a} and max_completion_tokens={b} disagree: give one", "max_tokens")
    value = a if a is not None else b
    param = "max_tokens" if a is not None or b is None else "max_completion_tokens"
    if value is None:
        return config.max_tokens
    if value > config.max_tokens_limit:
        raise bad_request(f"{param}={value} exceeds the server's limit of {config.max_tokens_limit}", param)
    return value


def _common_checks(body: Any, config: ServerConfig) -> None:
    if body.model != config.model_name:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves "
                       f"{config.model_name!r} (GET /v1/models)", param="model", code="model_not_found")
    bad = unsupported_fields(body)
    if bad is not None:
        raise bad_request(bad[1], bad[0], "unsupported_value")
    if body.stop:
        raise bad_request(
            "stop sequences are not supported: cutting particles at a stop string after sampling would "
            "change the target p^alpha (defined on completions that end with EOS or at max_tokens), "
            "so it cannot be honoured exactly; the sampler stops at EOS or max_tokens", "stop",
            "unsupported_value")


def _constraint(body: Any) -> Any:
    """The grammar constraint of ``response_format`` / ``structured_outputs`` (None for free text):
    ``pp.constraints.JSONSchema`` / ``Regex`` / ``Choice`` / ``Grammar``; a bad one is a 400 naming it."""
    try:
        spec = constraint_spec(body)
    except ValueError as exc:
        raise bad_request(str(exc), "response_format" if body.response_format is not None else "structured_outputs",
                          "invalid_value") from None
    if spec is None:
        return None
    kind, param, value = spec
    try:
        from ..targets import constraints

        make = {"json_schema": constraints.JSONSchema, "regex": constraints.Regex, "choice": constraints.Choice,
                "grammar": constraints.Grammar}[kind]
        return make(value)
    except ImportError as exc:
        raise bad_request(f"{param} needs grammar constraints on the server: {exc}", param, "unsupported_value") from None
    except ValueError as exc:
        raise bad_request(f"{param}: {exc}", param, "invalid_value") from None


def _check_prompt(lm: Any, ids: list[int], max_tokens: int, param: str) -> list[int]:
    try:
        return lm.check_prompt(ids, max_tokens)
    except ValueError as exc:
        code = "context_length_exceeded" if "context" in str(exc) else "invalid_value"
        raise bad_request(f"{param}: {exc}", param.split("[")[0].split(".")[0], code) from None


# ---------------------------------------------------------------- the app
def create_app(lm: Any, config: ServerConfig | None = None, potential: Any = None) -> FastAPI:
    """An OpenAI-compatible app serving ``lm``.

    ``potential``: an extra factor (reward tilt, constraint) every request's target gets:
    ``Power(alpha) * potential``.  The app's batcher starts and stops with the app (lifespan).
    """
    config = config or ServerConfig(model_name=getattr(lm, "name", "llmppl"))
    batcher = Batcher(lm, config, potential)
    started = time.time()
    has_chat = getattr(getattr(lm, "tokenizer", None), "chat_template", None) is not None

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        batcher.start()
        try:
            yield
        finally:
            batcher.shutdown()
            await batcher.stop()

    app = FastAPI(title="llmppl", description="OpenAI-compatible sampling from p^alpha", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.config = config
    install_handlers(app)
    app.add_middleware(Guard, config=config)

    def model_card() -> dict[str, Any]:
        return {"id": config.model_name, "object": "model", "created": int(started), "owned_by": "llmppl"}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": config.model_name, "queued": len(batcher.pending),
                "running": len(batcher.running), "uptime_s": time.time() - started,
                "stats": batcher.stats.as_dict(), "config": config.public()}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != config.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
        return model_card()

    async def serve(request: Request, body: Any, kind: str, prompts: list[list[int]], max_tokens: int,
                    settings: RunSettings) -> Response:
        sharpened = METHODS[settings.method].sharpened
        job = Job(prompts=prompts, settings=settings, alpha=settings.options.alpha if sharpened else 1.0,
                  seed=body.seed, future=asyncio.get_running_loop().create_future(), constraint=_constraint(body))
        try:
            batcher.submit(job)
        except QueueFull as exc:
            raise APIError(429, str(exc), code="queue_full") from None
        except ShuttingDown as exc:
            raise APIError(503, str(exc), code="server_shutting_down") from None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(body, kind, prompts, job, include_usage),
                                     media_type="text/event-stream")
        results = await _wait(request, job)
        if results is None:  # the client went away; nobody reads this
            return Response(status_code=499)
        _check_results(results)
        return JSONResponse(_body(body, kind, prompts, job, results))

    def _check_results(results: list[Any]) -> None:
        for p, res in enumerate(results):
            if res.error is not None or res.n == 0:
                batcher.stats.failed += 1
                where = f"prompt {p}: " if len(results) > 1 else ""
                raise APIError(422, f"{where}{res.error or 'no sample'}", param=None, code="all_particles_died")

    def _body(body: Any, kind: str, prompts: list[list[int]], job: Job, results: list[Any]) -> dict[str, Any]:
        settings = job.settings
        meta = {"method": settings.method, "alpha": job.alpha,
                "particles": 1 if settings.method == "greedy" else settings.options.particles,
                "seed": body.seed, "queue_time": (job.started or job.enqueued) - job.enqueued,
                "batch": job.batch or {}}
        out = responses.build(kind, config.model_name, prompts, results, body.n, meta)
        batcher.stats.completed += 1
        return out

    async def _stream(body: Any, kind: str, prompts: list[list[int]], job: Job, include_usage: bool) -> Any:
        """Server-sent events: a progress event (``choices: []``, an ``llmppl.progress`` object) when the
        request is queued, when its batch starts and every ``PROGRESS_EVERY_S`` while it runs; then the
        answer, [usage], ``[DONE]``.  SMC's answer is known only when its run ends (resampling can
        replace any prefix), so no token is sent before then.  An error once the stream has started is
        an ``{"error": ...}`` event, then ``[DONE]``."""
        stream = responses.Stream(kind, config.model_name, include_usage)
        try:
            info = job.progress()
            yield stream.progress(info)
            while not job.future.done():
                try:
                    await asyncio.wait_for(asyncio.shield(job.future), PROGRESS_EVERY_S)
                except asyncio.TimeoutError:
                    pass
                except Exception:  # noqa: BLE001 - the job's error: _outcome answers it
                    break
                now = job.progress()
                if not job.future.done() and (now["status"] != info["status"] or now["status"] == "running"):
                    info = now
                    yield stream.progress(info)
            try:
                results = _outcome(job)
                _check_results(results)
                events = stream.answer(_body(body, kind, prompts, job, results))
            except APIError as err:
                events = stream.error(err.status, err.message, err.param, err.code, err.type)
            for event in events:
                yield event
        except asyncio.CancelledError:  # the client went away (or the server stops)
            batcher.cancel(job)
            raise

    def _outcome(job: Job) -> list[Any]:
        """The results of a finished job, or the :class:`APIError` its failure answers."""
        exc = job.future.exception()
        if exc is None:
            return job.future.result()
        if isinstance(exc, ShuttingDown):
            raise APIError(503, str(exc), code="server_shutting_down")
        batcher.stats.failed += 1
        if isinstance(exc, ValueError):
            raise bad_request(str(exc), None)
        raise APIError(500, f"sampling failed: {type(exc).__name__}: {exc}", code="sampling_failed")

    async def _wait(request: Request, job: Job) -> list[Any] | None:
        """The job's results, or None if the client disconnects first (the job is then dropped)."""
        async def disconnected() -> None:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    return

        watcher = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({job.future, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            batcher.cancel(job)
            raise
        finally:
            watcher.cancel()
        if not job.future.done():
            batcher.cancel(job)
            return None
        return _outcome(job)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await _parse(request, ChatCompletionRequest)
        _common_checks(body, config)
        max_tokens = _max_tokens(body, config)
        settings = _settings(body, config, max_tokens)
        if config.chat and not has_chat:
            raise bad_request(f"{config.model_name} has no chat template: use /v1/completions", "messages",
                              "no_chat_template")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            if config.chat:
                ids = lm.encode_prompt(messages, chat=True)
            else:
                ids = lm.encode_prompt("\n".join(m["content"] for m in messages), chat=False)
        except Exception as exc:  # the chat template rejects this conversation (e.g. role order)
            raise bad_request(f"messages: cannot apply the chat template: {exc}", "messages") from None
        ids = _check_prompt(lm, ids, max_tokens, "messages")
        return await serve(request, body, "chat", [ids], max_tokens, settings)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _parse(request, CompletionRequest)
        _common_checks(body, config)
        max_tokens = _max_tokens(body, config)
        settings = _settings(body, config, max_tokens)
        if len(body.prompt) > config.max_batch_prompts:
            raise bad_request(f"{len(body.prompt)} prompts exceed the server's limit of "
                              f"{config.max_batch_prompts} per request", "prompt")
        prompts = []
        for i, p in enumerate(body.prompt):
            where = "prompt" if len(body.prompt) == 1 else f"prompt[{i}]"
            try:
                ids = lm.encode_prompt(p, chat=False)
            except ValueError as exc:
                raise bad_request(f"{where}: {exc}", "prompt") from None
            prompts.append(_check_prompt(lm, ids, max_tokens, where))
        return await serve(request, body, "text", prompts, max_tokens, settings)

    return app
