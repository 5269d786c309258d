"""The web UI under ``/ui/``: server-rendered pages (Jinja2, autoescaped) plus a little
JavaScript (``api/static/ui.js``) and the vendored uPlot for charts. No build step.

Pages: the runs list, a run followed live (the API's event stream), the core browser (every
latent of a cycle's selected core, or of the distilled core, with its top-activating
contexts), a run's transfer results, the sweeps list and a sweep. Every page reads through the
same ``Runs`` / ``Sweeps`` objects and ``dmsae_ray.service`` functions as the REST endpoints;
the buttons and the live updates call the REST API itself.

Authentication is the API's (``api/security.BearerAuth``): with a token, ``/ui/login`` trades
it for an HttpOnly, SameSite=Strict session cookie that the API accepts too; without one the
server is open on loopback (and checks the Host header) as for the API. docs/ui.md has the
details.

The core browser's contexts are what ``dmsae inspect`` computes; they need torch and the
model, which this process never imports: the first request for a cycle starts
``python -m dmsae_ray.tools.inspect_latents RUN_DIR CYCLE`` in a subprocess (one at a time), which
writes ``cycles/NNN/inspect.json``; the page says "computing" until the file is there.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, select_autoescape

from api.security import SESSION_COOKIE, SESSION_TTL_S, BearerAuth, same_origin
from api.ui_data import Contexts, Curves, artifact_json, finite
from dmsae_ray import service

if TYPE_CHECKING:
    from api.app import Runs, Settings
    from api.sweeps import Sweeps

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

# The core browser's cache, written by dmsae_ray/tools/inspect_latents.py (keep these in step with
# its CACHE_FILE, CACHE_VERSION and CACHE_DEFAULTS; tests/test_ui.py checks).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

# "[cycle 2] step 400/512 mse 0.1234 nested 0.2345 L0 64.0 (core 6.9) dead 3", the line every
# trainer prints each train.log_every steps (dmsae_ray/algo/trainer.py MetricWindow.line); on Ray
# it is prefixed by the worker's name.
class LoginRequired(Exception):
    def __init__(self, next_url: str) -> None:
        self.next_url = next_url


def safe_next(value: str | None) -> str:
    """Where to go after the login: a page of the UI, never another site."""
    if value and value.startswith("/ui/") and "//" not in value and "\\" not in value:
        return value
    return "/ui/"


def progress_of(view: dict) -> dict:
    """The runs list's progress: committed cycles plus the training share of the current one."""
    total = max(int(view.get("cycles_total") or 1), 1)
    done = int(view.get("cycle") or 0)
    p = view.get("progress") or {}
    within, label = 0.0, view.get("stage") or ""
    if view.get("stage") == "train" and p.get("tokens_total"):
        within = min(1.0, (p.get("tokens_done") or 0) / p["tokens_total"])
        label = f"train {100 * within:.0f}%"
    elif view.get("stage") in ("evaluate", "attribute"):
        within = 1.0
    if view.get("status") == "completed":
        done, within, label = total, 0.0, ""
    return {
        "fraction": min(1.0, (done + 0.9 * within) / total),
        "label": label,
        "cycles": f"{min(done, total)}/{total}",
    }


# --------------------------------------------------------------------------- routes


class _UIRoute(APIRoute):
    """Errors of a page as an HTML page (401: to the login form), of the UI's JSON
    endpoints as JSON; every response with the UI's security headers."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def wrapped(request: Request) -> Response:
            try:
                response = await handler(request)
            except LoginRequired as err:
                response = RedirectResponse(f"/ui/login?next={quote(err.next_url)}", 303)
            except HTTPException as err:
                if request.url.path.endswith(".json") or request.method != "GET":
                    response = JSONResponse({"detail": err.detail}, err.status_code,
                                            headers=err.headers)
                else:
                    response = _TEMPLATES.TemplateResponse(
                        request, "error.html",
                        {"code": err.status_code, "detail": err.detail, "open": None},
                        status_code=err.status_code,
                    )
            for k, v in HEADERS.items():
                response.headers.setdefault(k, v)
            return response

        return wrapped


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )

    def num(v: Any, digits: int = 3) -> str:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "–"
        if isinstance(v, bool) or not isinstance(v, int | float):
            return str(v)
        if isinstance(v, int):
            return f"{v:,}"
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"

    def when(t: Any) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "–"

    env.filters["num"] = num
    env.filters["when"] = when
    env.filters["pct"] = lambda v: "–" if v is None else f"{100 * v:.2f}%"
    return env


_TEMPLATES = Jinja2Templates(env=_environment())


def mount_ui(app: FastAPI, runs: Runs, sweeps: Sweeps, settings: Settings,
             auth: BearerAuth) -> None:
    """The pages under /ui/ and their static files under /ui/static/."""
    templates = _TEMPLATES
    contexts = Contexts()
    curves = Curves(runs.jobs)
    app.state.ui_contexts = contexts

    def page_auth(request: Request) -> None:
        """The API's authentication; a browser without a valid session goes to the login."""
        try:
            auth(request)
        except HTTPException as err:
            if err.status_code == 401 and request.method == "GET":
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                raise LoginRequired(target) from None
            raise

    ui = APIRouter(prefix="/ui", route_class=_UIRoute, include_in_schema=False)
    pages = APIRouter(route_class=_UIRoute, dependencies=[Depends(page_auth)])

    def render(request: Request, name: str, status_code: int = 200, **ctx: Any) -> HTMLResponse:
        ctx.setdefault("open", auth.open)
        return templates.TemplateResponse(request, name, ctx, status_code=status_code)

    # ------------------------------------------------------------------ login
    @ui.get("/login")
    def login_form(request: Request, next: str | None = None) -> Response:
        if auth.open:
            return RedirectResponse(safe_next(next), 303)
        return render(request, "login.html", next=safe_next(next), error=None)

    @ui.post("/login")
    async def login(request: Request) -> Response:
        if not same_origin(request):
            raise HTTPException(403, "cross-origin login refused")
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        target = safe_next((form.get("next") or [None])[0])
        if auth.open:
            return RedirectResponse(target, 303)
        token = (form.get("token") or [""])[0]
        if not auth.check_token(token):
            return render(request, "login.html", status_code=403, next=target,
                          error="invalid token")
        response = RedirectResponse(target, 303)
        response.set_cookie(
            SESSION_COOKIE, auth.session_cookie(), max_age=SESSION_TTL_S, path="/",
            httponly=True, samesite="strict", secure=request.url.scheme == "https",
        )
        return response

    @ui.post("/logout")
    def logout(request: Request) -> Response:
        if not same_origin(request):
            raise HTTPException(403, "cross-origin logout refused")
        response = RedirectResponse("/ui/login" if not auth.open else "/ui/", 303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    # ------------------------------------------------------------------ runs
    @pages.get("/")
    def runs_page(request: Request) -> HTMLResponse:
        items = runs.list(None, 500, 0)["items"]
        rows = [v | {"bar": progress_of(v)} for v in items]
        return render(request, "runs.html", runs=rows, root=str(settings.runs_root),
                      page="runs")

    @pages.get("/runs.json")
    def runs_json() -> dict:
        """What the runs list updates live (its progress bars need more than the API's list)."""
        items = runs.list(None, 500, 0)["items"]
        keys = ("id", "status", "stage", "core_size", "error")
        return {"items": [finite({k: v[k] for k in keys} | {"bar": progress_of(v)})
                          for v in items]}

    @pages.get("/runs/{run_id}")
    def run_page(request: Request, run_id: str) -> HTMLResponse:
        rec = runs.record(run_id)
        view = runs.view(rec)
        has_transfer = artifact_json(rec.run_dir, "transfer/transfer.json") is not None
        return render(request, "run.html", run=view, data=finite(view), page="run",
                      has_transfer=has_transfer, progress_bar=progress_of(view))

    @pages.get("/runs/{run_id}/curve.json")
    def run_curve(run_id: str) -> JSONResponse:
        rec = runs.record(run_id)
        terminal = rec.status_final
        try:
            return JSONResponse(curves.get(rec.job_ids, terminal))
        except service.ServiceError as err:
            return JSONResponse({"cycles": {}, "error": str(err)})

    def _cycle_of(view: dict, cycle: str | None) -> int:
        n = len(view["cycles"])
        if cycle in (None, "", "final"):
            return n - 1
        try:
            c = int(cycle)
        except ValueError:
            raise HTTPException(404, f"no cycle {cycle!r}") from None
        if not 0 <= c < n:
            raise HTTPException(404, f"cycle {c} of {view['id']} is not committed")
        return c

    @pages.get("/runs/{run_id}/core")
    def core_page(request: Request, run_id: str, cycle: str | None = None) -> HTMLResponse:
        rec = runs.record(run_id)
        view = runs.view(rec, detail=False)
        c = _cycle_of(view, cycle)
        ctx: dict[str, Any] = {"run": view, "cycle": c, "page": "core", "latents": [],
                               "state": None, "message": None, "distilled": False}
        if c < 0:
            ctx["message"] = "No cycle is committed yet: the core browser shows a cycle's " \
                "selected core once the cycle is committed."
            return render(request, "core.html", **ctx)
        cores = [artifact_json(rec.run_dir, f"cycles/{k:03d}/core.json") or {}
                 for k in range(len(view["cycles"]))]
        counts = Counter(tuple(i) for core in cores for i in core.get("ids", []))
        core = cores[c]
        final = c == len(cores) - 1
        distilled = artifact_json(rec.run_dir, "core/core.json") if final else None
        state, data = ("ready", None)
        if core.get("indices"):
            state, data = contexts.state(rec.run_dir, c)
        by_index = {r["index"]: r for r in (data or {}).get("latents", [])}
        densities = core.get("densities") or [None] * len(core.get("indices", []))
        latents = []
        for rank, (index, lid, score, density) in enumerate(
            zip(core.get("indices", []), core.get("ids", []), core.get("scores", []),
                densities, strict=False), 1,
        ):
            inspected = by_index.get(index) or {}
            latents.append({
                "rank": rank, "index": index, "id": f"{lid[0]}:{lid[1]}", "origin": lid[0],
                "times": counts[tuple(lid)], "score": score, "density": density,
                "heldout_density": inspected.get("density"), "tokens": inspected.get("tokens"),
                "frozen": inspected.get("frozen_core"), "top": inspected.get("top"),
            })
        ctx.update(
            latents=latents, state=state, distilled=distilled is not None,
            error=data if state == "failed" else None, fraction=core.get("fraction"),
            tau=core.get("tau"), cycles=len(cores), computed=data if state == "ready" else None,
            origins=sorted(Counter(latent["origin"] for latent in latents).items()),
        )
        return render(request, "core.html", **ctx)

    @pages.get("/runs/{run_id}/core/status.json")
    def core_status(run_id: str, cycle: str | None = None) -> dict:
        rec = runs.record(run_id)
        c = _cycle_of(runs.view(rec, detail=False), cycle)
        state, data = contexts.state(rec.run_dir, c, start=False) if c >= 0 else ("missing", None)
        return {"cycle": c, "state": state, "error": data if state == "failed" else None}

    @pages.post("/runs/{run_id}/core/compute.json")
    def core_compute(run_id: str, cycle: str | None = None) -> dict:
        """Start (again) computing a cycle's contexts, e.g. after a failure."""
        rec = runs.record(run_id)
        c = _cycle_of(runs.view(rec, detail=False), cycle)
        if c < 0:
            raise HTTPException(409, "no committed cycle")
        state, _ = contexts.retry(rec.run_dir, c)
        return {"cycle": c, "state": state}

    @pages.get("/runs/{run_id}/transfer")
    def transfer_page(request: Request, run_id: str) -> HTMLResponse:
        rec = runs.record(run_id)
        view = runs.view(rec, detail=False)
        data = artifact_json(rec.run_dir, "transfer/transfer.json")
        tally: dict[str, Counter] = {}
        for against, comps in ((data or {}).get("comparisons") or {}).items():
            for comp in comps:
                tally.setdefault(f"{comp['metric']} vs {against}", Counter())[comp["verdict"]] += 1
        return render(request, "transfer.html", run=view, page="transfer",
                      transfer=finite(data) if data else None, tally=tally)

    # ------------------------------------------------------------------ sweeps
    @pages.get("/sweeps")
    def sweeps_page(request: Request) -> HTMLResponse:
        items = sweeps.list(None, 500, 0)["items"]
        return render(request, "sweeps.html", sweeps=items, page="sweeps",
                      root=str(sweeps.root))

    @pages.get("/sweeps/{sweep_id}")
    def sweep_page(request: Request, sweep_id: str) -> HTMLResponse:
        from api.sweeps import SweepNotFound

        try:
            view = sweeps.view(sweep_id)
        except SweepNotFound as err:
            raise HTTPException(404, str(err)) from None
        return render(request, "sweep.html", sweep=view, data=finite(view), page="sweep")

    @ui.get("", include_in_schema=False)
    def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/", 307)

    ui.include_router(pages)
    app.include_router(ui)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
