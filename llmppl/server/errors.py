"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with the right HTTP status.

Every failure the server answers goes through :func:`error_response`: bad input is a 400 naming
the field (pydantic validation errors included: 400, not FastAPI's 422), a wrong or missing API
key 401, an unknown model or route 404, a full queue 429, a request whose particles all died 422,
and only a genuine server fault 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("llmppl.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          422: "sampling_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error answered as OpenAI-style JSON with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    """A 400 naming ``param``."""
    return APIError(400, message, param=param, code=code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None,
               type: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type or _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(err: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.param, err.code, err.type),
                        status_code=err.status, headers=headers)


def _loc_param(loc: tuple[Any, ...]) -> tuple[str | None, str]:
    """``("body", "messages", 0, "content")`` -> (``"messages"``, ``"messages.0.content"``)."""
    parts = [str(p) for p in loc if p not in ("body",)]
    return (parts[0] if parts else None), ".".join(parts)


def validation_error(errors: list[Any]) -> APIError:
    """The first pydantic error as a 400 naming its field."""
    errors = list(errors)
    if not errors:
        return bad_request("invalid request body")
    first = errors[0]
    kind = first.get("type", "")
    param, where = _loc_param(tuple(first.get("loc", ())))
    if kind == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "),
                           None, "invalid_json")
    if kind == "extra_forbidden":
        msg = f"unknown field {where!r}: not an OpenAI or llmppl request field"
    elif kind == "missing":
        msg = f"{where}: this field is required"
    elif kind in ("model_attributes_type", "model_type", "dict_type") and not where:
        msg = "the request body must be a JSON object"
    else:
        text = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        msg = f"{where}: {text}" if where else text
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more error(s))"
    return bad_request(msg, param, kind or "invalid_value")


def install_handlers(app: FastAPI) -> None:
    """Route every error through :func:`error_response`."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err = APIError(404, f"no route {request.method} {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            err = APIError(405, f"method {request.method} is not allowed on {request.url.path}",
                           code="method_not_allowed")
        else:
            err = APIError(exc.status_code, str(exc.detail))
        return error_response(err, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:  # a bug, not bad input
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal server error: {type(exc).__name__}: {exc}",
                                       code="internal_error"))
