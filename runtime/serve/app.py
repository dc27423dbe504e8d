"""The Starlette app: routes registered in one function, thin handlers, one error shape.

Every error, including Starlette's own 404/405, is ``{"error": "<message>"}`` (tritonclient
decodes every non-200 body as JSON and reads ``["error"]``); statuses come from
:func:`runtime.serve.errors.http_status`.

The infer route, the hot path, skips Starlette's router (:class:`_InferRoute`, the outermost
middleware but Starlette's 500 handler): matching every route in turn, its exception layers and
the endpoint wrapper cost about 45 us per request on a 2-core VM, as much as the whole request
path of a small model besides its parse and run.  Only ``POST`` to an infer path is taken
there, with the same handler and error responses; anything else, a ``GET`` to an infer path
included (405), goes through the router.  It is also where the event loop busy polls after an
answer (:mod:`runtime.serve.busypoll`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from starlette._utils import get_route_path  # what Starlette's router matches (pinned version)
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from normport.export.about import version
from normport.runtime.serve import busypoll, inference
from normport.runtime.serve.admission import Budget
from normport.runtime.serve.body import DEFAULT_MAX_BODY_BYTES, read_body
from normport.runtime.serve.errors import BadRequest, ServeError, ServerNotReady, http_status
from normport.runtime.serve.metrics import CONTENT_TYPE, Metrics
from normport.runtime.serve.probe import DEFAULT_TIMEOUT_S as DEFAULT_LOAD_TIMEOUT_S
from normport.runtime.serve.repository import ModelVersion, Repository, default_memory_budget

__all__ = ["EXTENSIONS", "SERVER_NAME", "create_app"]

log = logging.getLogger(__name__)

SERVER_NAME = "normport"
# Only what is served in full.  Not listed: model_repository (index only; no load/unload).
EXTENSIONS = ("binary_tensor_data", "model_configuration", "statistics")
_INDEX_BODY_LIMIT = 64 * 1024


def _json(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status, media_type="application/json")


@dataclass
class _Server:
    repository: Repository
    metrics: Metrics
    max_body_bytes: int
    strict_readiness: bool
    memory: Budget
    stopping: bool = False


class _Handlers:
    """The endpoints; each resolves its model, calls one function and returns JSON."""

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.repo = server.repository

    def _model(self, request: Request) -> ModelVersion:
        params = request.path_params
        return self.repo.resolve(params["model"], params.get("version"))

    async def live(self, request: Request) -> Response:
        return _json({"live": True})

    async def ready(self, request: Request) -> Response:
        if self.server.stopping:
            raise ServerNotReady("the server is shutting down")
        if self.server.strict_readiness and not self.repo.all_ready:
            raise ServerNotReady("not every model is ready (see POST /v2/repository/index)")
        return _json({"ready": True})

    async def server_metadata(self, request: Request) -> Response:
        return _json({"name": SERVER_NAME, "version": version(), "extensions": list(EXTENSIONS)})

    async def model_metadata(self, request: Request) -> Response:
        model = self._model(request)
        assert model.spec is not None  # resolve() returns READY versions only
        return _json(model.spec.metadata(self.repo.ready_versions(model.name)))

    async def model_ready(self, request: Request) -> Response:
        model = self._model(request)
        return _json({"name": model.name, "version": model.version, "ready": True})

    async def model_config(self, request: Request) -> Response:
        model = self._model(request)
        assert model.spec is not None and model.session is not None  # READY
        return _json(model.spec.config_json(model.session.device_kind))

    async def infer(self, request: Request) -> Response:
        if self.server.stopping:
            raise ServerNotReady("the server is shutting down")
        model = self._model(request)
        return await inference.infer(model, request, self.server.max_body_bytes, self.server.memory)

    async def statistics(self, request: Request) -> Response:
        params = request.path_params
        if "model" not in params:
            chosen = [v for v in self.repo.versions() if v.ready]
        elif "version" in params:
            chosen = [self._model(request)]
        else:
            self._model(request)  # 404 / 503 for an unknown or unloaded model
            chosen = [v for v in self.repo.models[params["model"]].values() if v.ready]
        return _json({"model_stats": [v.stats.json() for v in chosen if v.stats is not None]})

    async def repository_index(self, request: Request) -> Response:
        body = await read_body(request, _INDEX_BODY_LIMIT)
        options = {}
        if body.strip():
            try:
                options = orjson.loads(body)
            except orjson.JSONDecodeError as e:
                raise BadRequest(f"malformed repository index request JSON: {e}") from None
        if not isinstance(options, dict) or not isinstance(options.get("ready", False), bool):
            raise BadRequest('the repository index request must be {"ready": true|false}')
        return _json(self.repo.index(ready_only=options.get("ready", False)))

    async def metrics(self, request: Request) -> Response:
        return Response(self.server.metrics.exposition(), media_type=CONTENT_TYPE)


def routes(h: _Handlers) -> list[BaseRoute]:
    """Every route (routes are matched in order): ``/v2/models/stats`` before
    ``/v2/models/{model}``.  A ``POST`` to infer is served before the router
    (:class:`_InferRoute`, matching the same paths); its routes here answer other methods."""
    versioned = ("/v2/models/{model}", "/v2/models/{model}/versions/{version}")
    table: list[tuple[str, Any, str]] = [(f"{base}/infer", h.infer, "POST") for base in versioned]
    table += [
        ("/v2/health/live", h.live, "GET"),
        ("/v2/health/ready", h.ready, "GET"),
        ("/v2", h.server_metadata, "GET"),
        ("/v2/models/stats", h.statistics, "GET"),
        ("/v2/repository/index", h.repository_index, "POST"),
        ("/metrics", h.metrics, "GET"),
    ]
    for base in versioned:
        table += [
            (base, h.model_metadata, "GET"),
            (f"{base}/ready", h.model_ready, "GET"),
            (f"{base}/config", h.model_config, "GET"),
            (f"{base}/stats", h.statistics, "GET"),
        ]
    return [Route(path, endpoint, methods=[method]) for path, endpoint, method in table]


async def _serve_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServeError)
    return _json({"error": str(exc)}, http_status(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    response = _json({"error": exc.detail}, exc.status_code)
    response.headers.update(exc.headers or {})
    return response


async def _client_gone(request: Request, exc: Exception) -> Response:
    """The client went away (or was cut off: a body timeout) before its request was complete:
    not a server error.  The response is never sent (uvicorn drops writes to a closed
    connection); it exists because a handler must return one."""
    log.debug("client disconnected during %s %s", request.method, request.url.path)
    return _json({"error": "the client disconnected before the request was complete"}, 400)


# The infer routes of :func:`routes` (Starlette's ``{param}``: one or more characters but "/").
_INFER_PATH = re.compile(r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")


class _InferRoute:
    """Serves ``POST`` to the infer routes with ``infer`` and the app's error responses, busy
    polling for ``busy_poll_s`` after each answer (0: never); passes everything else to ``app``
    (module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        infer: Callable[[Request], Awaitable[Response]],
        busy_poll_s: float = busypoll.DEFAULT_WINDOW_S,
    ) -> None:
        self.app = app
        self.infer = infer
        self.busy_poll_s = busy_poll_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = None
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _INFER_PATH.fullmatch(get_route_path(scope))
        if match is None:
            await self.app(scope, receive, send)
            return
        if self.busy_poll_s:
            busypoll.on_arrival()
        scope["path_params"] = {k: v for k, v in match.groupdict().items() if v is not None}
        request = Request(scope, receive, send)
        try:
            response = await self.infer(request)
        except ServeError as exc:
            response = await _serve_error(request, exc)
        except ClientDisconnect as exc:
            response = await _client_gone(request, exc)
        await response(scope, receive, send)
        if self.busy_poll_s:
            busypoll.after_answer(self.busy_poll_s)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return _json({"error": f"internal server error ({type(exc).__name__})"}, 500)


def create_app(
    repository: str | os.PathLike,
    *,
    threads: int = 0,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    batching: bool = True,
    providers: Sequence[str] | None = None,
    strict_readiness: bool = False,
    memory_budget: int | None = None,
    model_memory_budget: int | None = None,
    load_timeout: float = DEFAULT_LOAD_TIMEOUT_S,
    probe_cache: str | os.PathLike | None = None,
    busy_poll_s: float = busypoll.DEFAULT_WINDOW_S,
) -> Starlette:
    """Load every model of ``repository`` and return the ASGI app serving them.

    Args:
        repository: the model repository folder (``make export`` writes one).
        threads: onnxruntime intra-op threads per model (0: onnxruntime's default).
        max_body_bytes: request body limit, compressed and decompressed (then 413).
        batching: False turns dynamic batching off for every model.
        providers: onnxruntime execution providers (default: CUDA when available, else CPU).
        strict_readiness: ``/v2/health/ready`` only when every model loaded (Triton's default);
            otherwise ready once loading is done, failed models showing in the index.
        memory_budget: bytes the requests in flight may take together (estimated; see
            :mod:`runtime.serve.admission`); default half the machine's memory.
        model_memory_budget: each model's budget unless its config sets one; default
            ``memory_budget``.
        load_timeout: seconds each model may take to load in its probe process.
        probe_cache: folder of kept probe results, so that a restart skips the probes of
            unchanged models (:mod:`runtime.serve.probe_cache`); None: probe every model.
        busy_poll_s: seconds the event loop polls without sleeping after answering an infer
            request whose client came back within that time (:mod:`runtime.serve.busypoll`;
            0: never).

    Raises:
        ValueError: ``repository`` is not a folder, or a bad option.
    """
    if max_body_bytes <= 0:
        raise ValueError(f"max_body_bytes must be > 0, got {max_body_bytes}")
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    for option, value in (
        ("memory_budget", memory_budget),
        ("model_memory_budget", model_memory_budget),
        ("load_timeout", load_timeout),
    ):
        if value is not None and not value > 0:
            raise ValueError(f"{option} must be > 0, got {value}")
    number = isinstance(busy_poll_s, int | float) and not isinstance(busy_poll_s, bool)
    if not (number and 0 <= busy_poll_s <= busypoll.MAX_WINDOW_S):
        raise ValueError(
            f"busy_poll_s must be a number of seconds in [0, {busypoll.MAX_WINDOW_S:g}], "
            f"got {busy_poll_s!r}"
        )
    memory_budget = memory_budget or default_memory_budget()
    memory = Budget("the server's memory budget", memory_budget, "--memory-budget")
    metrics = Metrics()
    repo = Repository(
        repository,
        threads=threads,
        batching=batching,
        providers=providers,
        metrics=metrics,
        model_memory_budget=model_memory_budget or memory_budget,
        load_timeout=load_timeout,
        probe_cache=probe_cache,
    )
    server = _Server(repo, metrics, max_body_bytes, strict_readiness, memory)
    handlers = _Handlers(server)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        server.stopping = True  # uvicorn has finished the in-flight requests by now
        await repo.close()

    app = Starlette(
        routes=routes(handlers),
        middleware=[Middleware(_InferRoute, infer=handlers.infer, busy_poll_s=busy_poll_s)],
        exception_handlers={
            ServeError: _serve_error,
            HTTPException: _http_error,
            ClientDisconnect: _client_gone,
            Exception: _internal_error,
        },
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False  # a wrong path is a JSON 404, not a redirect
    app.state.repository = repo
    app.state.metrics = metrics
    return app
