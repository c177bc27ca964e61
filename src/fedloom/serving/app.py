"""The prediction server of ``fedloom serve``: a run's global model behind a small JSON API (FastAPI).

Routes::

    POST /predict    {"instances": [example, ...]}  ->  {"run_id", "round", "outputs": [...], "predictions": [...]}
    GET  /model      what is served: run, round, job, task, input shape, params digest, largest batch
    GET  /health     {"status": "ok"}

A request the model cannot answer gets a 4xx with ``{"detail": message}``: 400 for a body that is not JSON, has
no ``instances`` list, or examples of the wrong shape, non-numbers or non-finite values (``NaN`` included), or
nested too deeply; 413 for more than :data:`~fedloom.serving.model.MAX_BATCH` instances or a body over 64 MiB
(from its declared ``Content-Length``, before the body is read); 415 for a body that is not
``application/json``. Bound to a loopback address it answers only loopback host names; with a ``token`` every
request needs ``Authorization: Bearer TOKEN``.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.middleware.trustedhost import TrustedHostMiddleware

from fedloom.serving.model import RequestError, ServedModel
from fedloom.ui.app import LOOPBACK_HOSTS

__all__ = ["create_app"]

_MAX_BODY = 64 * 2**20


def create_app(model: ServedModel, *, token: str | None = None, loopback_only: bool = True) -> FastAPI:
    """The prediction API over ``model``."""
    app = FastAPI(title="fedloom serve", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    if loopback_only:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK_HOSTS))
    if token is not None:
        expected = f"Bearer {token}".encode()

        @app.middleware("http")
        async def check(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
            if hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
                return await call_next(request)
            return JSONResponse({"detail": "send the server's token: Authorization: Bearer TOKEN"}, status_code=401)

    described = model.describe()

    @app.exception_handler(RequestError)
    async def _refused(_request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/model")
    def served() -> dict[str, Any]:
        return described

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        kind = request.headers.get("content-type", "application/json").split(";")[0].strip()
        if kind != "application/json":
            raise RequestError(415, f"send the instances as application/json, not {kind}")
        body = await _bounded_body(request)
        try:
            document = json.loads(body, parse_constant=_no_constant)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"the body is not JSON: {exc}") from None
        except RecursionError:
            raise RequestError(400, "the body's JSON is nested too deeply to be instances") from None
        if not isinstance(document, dict) or "instances" not in document:
            raise RequestError(400, 'the body must be a JSON object {"instances": [example, ...]}')
        try:
            x = model.instances(document["instances"])
        except RecursionError:
            raise RequestError(400, "the instances are nested too deeply to be examples") from None
        answer = model.predict(x)
        return Response(json.dumps(answer, separators=(",", ":")), media_type="application/json")

    return app


async def _bounded_body(request: Request) -> bytes:
    """The request's body, refused with 413 as soon as it is known to be larger than :data:`_MAX_BODY`: from its
    declared ``Content-Length`` before anything is read, else while it streams in."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError(400, f"Content-Length is not a number: {declared!r}") from None
        if size > _MAX_BODY:
            raise RequestError(413, f"the body is {size} bytes; send at most {_MAX_BODY}")
    chunks, received = [], 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > _MAX_BODY:
            raise RequestError(413, f"the body is more than {_MAX_BODY} bytes; send at most {_MAX_BODY}")
        chunks.append(chunk)
    return b"".join(chunks)


def _no_constant(name: str) -> Any:
    """JSON has no NaN or Infinity; Python's parser takes them unless told not to."""
    raise RequestError(400, f"the body holds {name}, which is not JSON (and not a finite number)")
