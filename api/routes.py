"""The routes of a REST collection (``api/resource.py``): ``register`` puts create, list,
get, events, logs, stop, resume, delete and artifact of one collection under its prefix
(``/v1/distillations``, ``/v1/sweeps``), with its request model and the names and descriptions
``api/app.py`` gives them in /docs; and the server-sent events of one item.
"""

# No ``from __future__ import annotations`` here: ``register`` builds its endpoints around the
# collection's request model, a local variable, which FastAPI must find as a type rather than
# as a string to resolve in this module's globals.

import asyncio
import inspect
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse

from api.models import Status
from api.resource import Resource, refuse_tokens
from dmsae_ray import service

if TYPE_CHECKING:
    from api.runs import Settings

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]
Submitter = Annotated[str | None, Header(alias="X-Submitter", max_length=200)]


def sse(event: str, data: Any, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(jsonable_encoder(data))}\n\n"


async def follow(
    res: Resource[Any], ident: str, poll_interval: float, keepalive: float
) -> AsyncIterator[str]:
    """Server-sent events of one item: ``res.update_event`` for each keyed part of its view (a
    committed cycle, a trial's row) that is new or changed, ``progress`` when the progress view
    changes, a keep-alive comment when nothing does, and ``end`` once the status is terminal
    (or the item is deleted)."""
    head = {"id": ident}
    seq, last, seen, last_sent = 0, None, {}, time.monotonic()
    while True:
        view = await asyncio.to_thread(res.snapshot, ident)
        if view is None:
            yield sse("end", head | {"status": "deleted"})
            return
        for key, data in res.updates(view):
            if seen.get(key) != data:
                seen[key] = data
                seq += 1
                yield sse(res.update_event, data, seq)
        current = head | res.progress(view)
        if current != last:
            seq += 1
            yield sse("progress", current, seq)
            last, last_sent = current, time.monotonic()
        elif time.monotonic() - last_sent > keepalive:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        if view["status"] in service.TERMINAL:
            seq += 1
            yield sse("end", current, seq)
            return
        await asyncio.sleep(poll_interval)


# --------------------------------------------------------------------------- routes


@dataclass(frozen=True)
class Op:
    """How /docs shows one route of a collection."""

    name: str  # the endpoint's name, which makes its operationId and summary
    doc: str  # its description
    model: Any = None  # its response_model; None: FastAPI's default (the return annotation)


# The routes every collection has.
OPS = ("create", "list", "get", "events", "logs", "stop", "resume", "delete", "artifact")


def _exposing(endpoint: Callable[..., Any], param: str) -> Callable[..., Any]:
    """``endpoint`` with its parameter ``ident`` shown to FastAPI as ``param``: the path
    parameter's name (``run_id``, ``sweep_id``) is part of the OpenAPI schema."""
    sig = inspect.signature(endpoint)
    if "ident" not in sig.parameters:
        return endpoint

    def arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs["ident"] = kwargs.pop(param)
        return kwargs

    call: Callable[..., Any]
    if inspect.iscoroutinefunction(endpoint):
        async def call(**kwargs: Any) -> Any:
            return await endpoint(**arguments(kwargs))
    else:
        def call(**kwargs: Any) -> Any:
            return endpoint(**arguments(kwargs))
    params = [p.replace(name=param) if p.name == "ident" else p for p in sig.parameters.values()]
    call.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return call


def register(
    router: APIRouter, res: Resource[Any], *, prefix: str, param: str, request_model: type,
    ops: Mapping[str, Op], tags: list[str], artifact_tags: list[str], settings: "Settings",
    after: Mapping[str, Callable[[], object]] | None = None,
) -> None:
    """The common routes of ``res`` on ``router`` under ``prefix``: create (``request_model``
    is the body), list, get, events, logs, stop, resume, delete, artifact. The item's path
    parameter is ``{param}``. ``ops`` names and documents each route, in the order they are
    added (the order /docs lists them in); ``after[op]`` adds the collection's own routes
    right after ``op``."""
    if set(ops) != set(OPS):
        raise ValueError(f"ops must document exactly {', '.join(OPS)}")
    one = f"{prefix}/{{{param}}}"

    def create(
        body: request_model,  # type: ignore[valid-type]
        request: Request,
        idempotency_key: IdempotencyKey = None,
        submitter: Submitter = None,
    ) -> Any:
        who = submitter or (request.client.host if request.client else None)
        view, created = res.create(body, idempotency_key, who)
        if created:  # 201 with where it is; an idempotent retry's 200 names the first
            return JSONResponse(status_code=201, content=jsonable_encoder(view),
                                headers={"Location": f"{router.prefix}{prefix}/{view['id']}"})
        return JSONResponse(status_code=200, content=jsonable_encoder(view),
                            headers={"Idempotent-Replayed": "true"})

    def list_items(
        status: Status | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict:
        return res.list(status, limit, offset)

    def get(ident: str) -> dict:
        return res.view(res.get(ident))

    async def events(ident: str) -> StreamingResponse:
        res.get(ident)
        return StreamingResponse(
            follow(res, ident, settings.poll_interval, settings.keepalive),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def logs(
        ident: str,
        attempt: Annotated[int | None, Query(ge=1, description="1 = first job")] = None,
        tail: Annotated[int | None, Query(ge=1, description="last N lines only")] = None,
    ) -> PlainTextResponse:
        return PlainTextResponse(res.logs(res.get(ident), attempt, tail))

    def stop(ident: str) -> Any:
        view, code = res.stop(res.get(ident))
        return JSONResponse(status_code=code, content=jsonable_encoder(view))

    def resume(ident: str) -> dict:
        return res.resume(res.get(ident))

    def delete(ident: str) -> None:
        res.delete(res.get(ident))

    def artifact(ident: str, path: str) -> FileResponse:
        item = res.get(ident)
        target = res.artifact(item, path)
        refuse_tokens(settings.serve_tokens, path, target, res.directory(item))
        return FileResponse(
            target, media_type=res.media.get(target.suffix, "application/octet-stream"),
            filename=target.name,
        )

    events_doc = f"`progress`, `{res.update_event}` and a final `end` event"
    routes: dict[str, tuple[str, str, Callable[..., Any], dict[str, Any]]] = {
        "create": (prefix, "POST", create, {"status_code": 201}),
        "list": (prefix, "GET", list_items, {}),
        "get": (one, "GET", get, {}),
        "events": (f"{one}/events", "GET", events, {
            "response_class": StreamingResponse,
            "responses": {200: {"content": {"text/event-stream": {}},
                                "description": events_doc}},
        }),
        "logs": (f"{one}/logs", "GET", logs, {"response_class": PlainTextResponse}),
        "stop": (f"{one}/stop", "POST", stop, {"status_code": 202}),
        "resume": (f"{one}/resume", "POST", resume, {"status_code": 202}),
        "delete": (one, "DELETE", delete, {"status_code": 204}),
        "artifact": (f"{one}/artifacts/{{path:path}}", "GET", artifact,
                     {"tags": artifact_tags, "response_class": FileResponse}),
    }
    for op, doc in ops.items():
        path, method, endpoint, kw = routes[op]
        if doc.model is not None:
            kw["response_model"] = doc.model
        router.add_api_route(
            path, _exposing(endpoint, param), methods=[method], name=doc.name,
            description=doc.doc, **{"tags": tags} | kw,
        )
        if after and op in after:
            after[op]()
