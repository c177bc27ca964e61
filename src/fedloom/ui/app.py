"""The dashboard's web app: a JSON API over :mod:`fedloom.tracking.views`, and the static page that draws it.

Routes (all ``GET``)::

    /                                   the page (static/index.html); the views are client-side (#/run/ID...)
    /static/...                         its script and style sheet
    /api/runs                           the run list (tracking.views.overview of each run)
    /api/runs/{run}                     a run: rounds, metrics, config, privacy (views.run_detail)
    /api/runs/{run}/clients             participation per client and round (views.clients_view)
    /api/runs/{run}/heatmap?metric=M    one per-client metric per round (views.heatmap)
    /api/runs/{run}/profile             the system profile per client (views.profile)
    /api/runs/{run}/clients/{client}    one client's records and events (views.client_detail)
    /api/compare?run=A&run=B...         runs side by side (views.compare_view)

Answers are cached per run and invalidated when the run's database changes (its size or modification time), so a
finished run is read once and a live run again after each recorded round. A run that is not there is a 404, a bad
parameter a 400, each with ``{"detail": message}``.

Access: bound to a loopback address the app answers only requests addressed to a loopback host name (so a web
page elsewhere cannot reach it through DNS rebinding). With a ``token`` every request must carry it: as
``Authorization: Bearer TOKEN``, as the cookie the page gets, or once as ``?token=TOKEN`` in the address, which
sets that cookie and redirects to the same address without it.
"""

from __future__ import annotations

import asyncio
import hmac
import queue
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware

from fedloom.core.errors import ConfigError, RunStoreError
from fedloom.core.strictjson import strict_dumps
from fedloom.tracking import views
from fedloom.tracking.store import RunStore

__all__ = ["COOKIE", "LOOPBACK_HOSTS", "create_app"]

COOKIE = "fedloom_token"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
_CACHED_ANSWERS = 256
_WARM_STOP_SECONDS = 30.0  # one page view of a long run takes about a second; a stuck query must not hang shutdown


class _Cache:
    """Answers keyed by what was asked, each kept with the signature (:meth:`RunStore.signature`) of the runs it
    was computed from; an answer is reused while that signature holds."""

    def __init__(self, store: RunStore, size: int) -> None:
        self._store = store
        self._size = size
        self._items: OrderedDict[tuple[Any, ...], tuple[tuple[Any, ...], Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._computing: dict[tuple[Any, ...], threading.Lock] = {}

    def get(self, key: tuple[Any, ...], run_dirs: Sequence[Path], compute: Callable[[], Any]) -> Any:
        with self._lock:
            computing = self._computing.setdefault(key, threading.Lock())
        # One computation per key at a time: a request for what the warmer is computing waits for its answer.
        with computing:
            signature = tuple(n for run_dir in run_dirs for n in self._store.signature(run_dir))
            with self._lock:
                hit = self._items.get(key)
                if hit is not None and hit[0] == signature:
                    self._items.move_to_end(key)
                    return hit[1]
            value = compute()
            with self._lock:
                self._items[key] = (signature, value)
                self._items.move_to_end(key)
                while len(self._items) > self._size:
                    self._items.popitem(last=False)
            return value


def _json(value: Any) -> bytes:
    return strict_dumps(value, compact=True).encode()


def _json_of(compute: Callable[..., Any], *args: Any) -> bytes:
    return _json(compute(*args))


class _Warmer:
    """What a run's page asks for first, computed ahead in one background thread for every listed run, so that
    opening a long run (1,000 rounds x 100 clients take about a second to aggregate) finds it ready.

    It gives way to requests: it computes nothing while one is being answered (:meth:`answering`), so a page asked
    for while it works does not share the processor with runs nobody opened. It lives as long as the app serves
    (:meth:`lifespan`) and is stopped, and waited for, when the server shuts down, so that none of its queries is
    left running on a database connection the process is about to close."""

    def __init__(self, store: RunStore, cache: _Cache) -> None:
        self._store = store
        self._cache = cache
        self._views: tuple[tuple[str, Callable[[str], Any]], ...] = (
            ("run", lambda ref: views.run_detail(store, ref)),
            ("clients", lambda ref: views.clients_view(store, ref)),
            ("heatmap", lambda ref: views.heatmap(store, ref, "accuracy")),
            ("profile", lambda ref: views.profile(store, ref)),
        )
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._busy = 0
        self._quiet = threading.Condition()
        self._stopping = threading.Event()

    def put(self, ref: str) -> None:
        """Compute ``ref``'s page ahead (again: answers still valid are cache hits)."""
        self._queue.put(ref)

    @contextmanager
    def answering(self) -> Iterator[None]:
        """Hold the warm-up back while a request is answered."""
        with self._quiet:
            self._busy += 1
        try:
            yield
        finally:
            with self._quiet:
                self._busy -= 1
                self._quiet.notify_all()

    @asynccontextmanager
    async def lifespan(self, _app: FastAPI) -> AsyncIterator[None]:
        thread = threading.Thread(target=self._run, name="fedloom-ui-warm", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stopping.set()
            self._queue.put(None)
            with self._quiet:
                self._quiet.notify_all()
            await asyncio.to_thread(thread.join, _WARM_STOP_SECONDS)

    def _run(self) -> None:
        for info in self._store.list_runs():
            self.put(info.path.name)
        while (ref := self._queue.get()) is not None:
            for kind, compute in self._views:
                with self._quiet:
                    self._quiet.wait_for(lambda: self._busy == 0 or self._stopping.is_set())
                if self._stopping.is_set():
                    return
                key = (kind, ref, "accuracy") if kind == "heatmap" else (kind, ref)
                try:
                    self._cache.get(key, [self._store.resolve(ref)], partial(_json_of, compute, ref))
                except (RunStoreError, ConfigError):
                    break  # the run went away or cannot be read; its page will say so when asked


def create_app(
    runs_dir: str | Path, *, token: str | None = None, loopback_only: bool = True, db_url: str | None = None
) -> FastAPI:
    """The dashboard over the runs in ``runs_dir`` (their rows in the shared database at ``db_url`` if given: see
    :class:`~fedloom.tracking.RunStore`). ``token``: required on every request when given. ``loopback_only``:
    answer only requests addressed to a loopback host name (set it when binding to one).

    Pages are computed ahead while the app's lifespan runs (uvicorn runs it; FastAPI's ``TestClient`` when used as
    a context manager), and that work stops with it."""
    store = RunStore(runs_dir, db_url)
    cache = _Cache(store, _CACHED_ANSWERS)
    warmer = _Warmer(store, cache)
    static = files("fedloom.ui").joinpath("static")
    app = FastAPI(
        title="fedloom", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json", lifespan=warmer.lifespan
    )
    if loopback_only:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK_HOSTS))
    if token is not None:
        _require_token(app, token)

    @app.exception_handler(RunStoreError)
    async def _not_found(_request: Request, exc: RunStoreError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(ConfigError)
    async def _bad_request(_request: Request, exc: ConfigError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    def cached(key: tuple[Any, ...], refs: Sequence[str], compute: Callable[[], Any]) -> Response:
        # Answers are cached as JSON text: large ones (a heat map of 100,000 cells) would spend more time in
        # FastAPI's generic encoder than in the database.
        body = cache.get(key, [store.resolve(ref) for ref in refs], lambda: _json(compute()))
        return Response(body, media_type="application/json")

    @app.middleware("http")
    async def count_answers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        with warmer.answering():
            return await call_next(request)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(str(static.joinpath("index.html")), headers={"Cache-Control": "no-cache"})

    @app.get("/api/runs")
    def run_list() -> Response:
        infos = store.list_runs()
        parts = [
            cache.get(("overview", str(info.path)), [info.path], partial(_json_of, views.overview, store, info))
            for info in infos
        ]
        for info in infos:
            warmer.put(info.path.name)
        return Response(b"[" + b",".join(parts) + b"]", media_type="application/json")

    @app.get("/api/runs/{run}")
    def run_detail(run: str) -> Response:
        return cached(("run", run), [run], lambda: views.run_detail(store, run))

    @app.get("/api/runs/{run}/clients")
    def clients(run: str) -> Response:
        return cached(("clients", run), [run], lambda: views.clients_view(store, run))

    @app.get("/api/runs/{run}/heatmap")
    def heatmap(run: str, metric: str = "accuracy") -> Response:
        return cached(("heatmap", run, metric), [run], lambda: views.heatmap(store, run, metric))

    @app.get("/api/runs/{run}/profile")
    def profile(run: str) -> Response:
        return cached(("profile", run), [run], lambda: views.profile(store, run))

    @app.get("/api/runs/{run}/clients/{client_id}")
    def client(run: str, client_id: str) -> Response:
        return Response(_json(views.client_detail(store, run, client_id)), media_type="application/json")

    @app.get("/api/runs/{run}/logs")
    def logs(
        run: str,
        q: str | None = None,
        client: str | None = None,
        level: str | None = None,
        round: int | None = None,
        limit: int = 200,
    ) -> Response:
        found = views.logs_view(store, run, text=q, client=client, level=level, server_round=round, limit=limit)
        return Response(_json(found), media_type="application/json")

    @app.get("/api/compare")
    def compare(run: list[str] = Query(default=[])) -> Response:  # noqa: B008 (FastAPI's way to declare a list)
        return cached(("compare", *run), run, lambda: views.compare_view(store, run))

    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    return app


def _require_token(app: FastAPI, token: str) -> None:
    expected = token.encode()

    def holds(given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), expected)

    @app.middleware("http")
    async def check(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        given = request.query_params.get("token")
        if given is not None:
            if not holds(given):
                return JSONResponse({"detail": "wrong token"}, status_code=401)
            others = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = (
                request.url.replace_query_params(**dict(others)) if others else request.url.remove_query_params("token")
            )
            answer = RedirectResponse(str(target), status_code=303)
            answer.set_cookie(COOKIE, token, httponly=True, samesite="strict")
            return answer
        header = request.headers.get("authorization", "")
        bearer = header[len("Bearer ") :] if header.startswith("Bearer ") else None
        if holds(bearer) or holds(request.cookies.get(COOKIE)):
            return await call_next(request)
        return JSONResponse(
            {"detail": "this dashboard needs its token: open the address fedloom ui printed (it ends in ?token=...)"},
            status_code=401,
        )
