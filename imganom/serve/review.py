"""``imganom review``: the web app where reviewers confirm or overturn the verdicts of an ``inspect`` folder.

``create_review_app(results_dir, ...)`` serves one page (``serve/static/review.html`` + ``review.js`` and
the report's shared ``gallery.js`` / ``gallery.css``) and a small JSON API over the folder:

- ``GET /api/info``: counts, thresholds, model, default reviewer, review statistics;
- ``GET /api/queue?sort=score|uncertainty&filter=all|ng|ok|error|unreviewed|reviewed&q=&offset=&limit=``:
  one page of the queue (the server sorts and filters, so 10,000+ rows cost the browser one page);
  ``uncertainty`` puts the images nearest the threshold first (``|norm_score - 0.5|``);
- ``GET /api/item?id=``: one result with its decision in force and its decision history;
- ``POST /api/decisions`` (JSON ``{id, decision, label, note, reviewer, mask}``, ``mask`` a PNG data URL):
  appends to ``reviews.jsonl`` through ``reporting.reviews.ReviewStore`` and refreshes ``summary.json``'s
  ``reviews`` block; ``decision: "undo"`` withdraws the image's last decision;
- ``GET /files/PATH``: a file of the results folder (images, masks); anything resolving outside it is 403.

Without a token (loopback only) requests must name a loopback ``Host`` (403 otherwise: DNS rebinding).
With a token every request needs it: ``Authorization: Bearer T``, ``X-Imganom-Token: T`` or the cookie set
by opening ``/?token=T`` once (401 otherwise). Writes need ``Content-Type: application/json``, which a
cross-site form cannot send without a CORS preflight this app never grants.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import math
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from imganom.reporting.html import card_data, write_report
from imganom.reporting.results import read_jsonl
from imganom.reporting.reviews import REVIEWS_FILE, ReviewStore, refresh_summary, resolve_inside, review_stats
from imganom.serve.errors import ApiError, add_error_handlers, error_response
from imganom.serve.server import is_loopback

COOKIE = "imganom_review_token"
MAX_BODY = 32 * 1024 * 1024  # a decision with a painted full-resolution mask stays far below
FILTERS = ("all", "ng", "ok", "error", "unreviewed", "reviewed")
STATIC = {  # name -> (package, file, media type)
    "gallery.js": ("imganom.reporting", "templates/gallery.js", "text/javascript"),
    "gallery.css": ("imganom.reporting", "templates/gallery.css", "text/css"),
    "review.js": ("imganom.serve", "static/review.js", "text/javascript"),
    "review.css": ("imganom.serve", "static/review.css", "text/css"),
}


class TokenAuth:
    """ASGI middleware: every request needs the token (bearer header, X-Imganom-Token or the cookie);
    ``GET /?token=T`` with the right token sets the cookie and redirects to ``/``."""

    def __init__(self, app: Any, token: str):
        self.app, self.token = app, token.encode()

    def _ok(self, given: bytes | str | None) -> bool:
        if not given:
            return False
        given = given.encode() if isinstance(given, str) else given
        return hmac.compare_digest(given.strip(), self.token)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        scheme, _, bearer = headers.get(b"authorization", b"").partition(b" ")
        raw = headers.get(b"cookie", b"").decode("latin-1").split(";")
        cookies = dict(c.strip().split("=", 1) for c in raw if "=" in c)
        bearer = bearer if scheme.lower() == b"bearer" else None
        given = (bearer, headers.get(b"x-imganom-token"), cookies.get(COOKIE))
        if any(self._ok(g) for g in given):
            return await self.app(scope, receive, send)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if scope["path"] == "/" and self._ok((query.get("token") or [""])[0]):
            resp = RedirectResponse("/", status_code=303)
            resp.set_cookie(COOKIE, self.token.decode(), httponly=True, samesite="strict")
            return await resp(scope, receive, send)
        msg = "missing or wrong token: open /?token=TOKEN once, or send 'Authorization: Bearer TOKEN'"
        await error_response(401, "unauthorized", msg)(scope, receive, send)


class LoopbackHost:
    """ASGI middleware for the token-less (loopback) app: refuses requests whose ``Host`` is not a loopback
    name, so a web page that rebinds its own domain to 127.0.0.1 cannot read or write decisions."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
            if not is_loopback(name):
                msg = f"Host {host!r} is not a loopback name; without --token the app answers only those"
                return await error_response(403, "forbidden_host", msg)(scope, receive, send)
        await self.app(scope, receive, send)


def _uncertainty(r: dict, threshold: float | None) -> float:
    if r["cat"] == "error" or r["score"] is None:
        return math.inf
    if r["norm"] is not None:
        return abs(r["norm"] - 0.5)
    return abs(r["score"] - threshold) if threshold is not None else math.inf


def _by_score(c: dict) -> tuple:
    return (c["score"] is None, -(c["score"] or 0.0), c["id"])


class ReviewData:
    """The results rows (as the report's card data, image paths under ``files/``) and their orders."""

    def __init__(self, results_dir: Path, model_id: str | None = None):
        self.dir = Path(results_dir)
        rows, _ = read_jsonl(self.dir / "results.jsonl")
        if not rows:
            raise FileNotFoundError(f"{self.dir}: no results.jsonl rows (write them with imganom inspect)")
        self.rows = rows
        summary_path = self.dir / "summary.json"
        self.summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else {}
        self.threshold = (self.summary.get("thresholds") or {}).get("image")
        self.model_id = model_id or (self.summary.get("model") or {}).get("id") or rows[0].get("model_id")
        self.cards = []
        for r in rows:
            c = card_data(r)
            c["img"] = {k: "files/" + v for k, v in c["img"].items()}
            heat = (r.get("outputs") or {}).get("heatmap")
            c["heatmap"] = "files/" + quote(str(heat)) if heat else None
            self.cards.append(c)
        self.index = {c["id"]: i for i, c in enumerate(self.cards)}
        n, thr = range(len(rows)), self.threshold
        self.orders = {
            "score": sorted(n, key=lambda i: _by_score(self.cards[i])),
            "uncertainty": sorted(n, key=lambda i: _uncertainty(self.cards[i], thr)),
        }

    def queue(self, sort: str, filt: str, q: str, decided: dict[str, dict]) -> list[int]:
        """Row indices in review order that pass the filter and the id search."""
        q = q.lower()
        out = []
        for i in self.orders[sort]:
            c = self.cards[i]
            if q and q not in c["id"].lower():
                continue
            if filt in ("ng", "ok", "error") and c["cat"] != filt:
                continue
            if filt == "unreviewed" and c["id"] in decided or filt == "reviewed" and c["id"] not in decided:
                continue
            out.append(i)
        return out


def _decode_mask(data_url: Any) -> bytes | None:
    if data_url is None:
        return None
    prefix = "data:image/png;base64,"
    if not isinstance(data_url, str) or not data_url.startswith(prefix):
        raise ApiError(422, "invalid_request", "mask must be a PNG data URL (data:image/png;base64,...)")
    try:
        return base64.b64decode(data_url[len(prefix) :], validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_request", "mask: invalid base64") from None


def create_review_app(
    results_dir: Path, *, model_id: str | None = None, reviewer: str | None = None, token: str | None = None
) -> FastAPI:
    """The review app over ``results_dir`` (an ``imganom inspect`` output folder)."""
    data = ReviewData(results_dir, model_id)
    store = ReviewStore(data.dir)
    state = {"changed": False}

    def stats() -> dict[str, Any]:
        return review_stats(data.rows, store.latest())

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        if state["changed"]:  # the static report shows the decisions too
            write_report(data.dir, data.rows, data.summary)

    app = FastAPI(title="imganom review", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(app)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        html = resources.files("imganom.serve").joinpath("static/review.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in STATIC:
            raise ApiError(404, "not_found", f"no static file {name!r}")
        pkg, rel, media = STATIC[name]
        return Response(resources.files(pkg).joinpath(rel).read_bytes(), media_type=media)

    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        cats = [c["cat"] for c in data.cards]
        return {
            "results_dir": data.dir.name,
            "counts": {"total": len(cats), **{k: cats.count(k) for k in ("ng", "ok", "error")}},
            "thresholds": data.summary.get("thresholds") or {},
            "model_id": data.model_id,
            "reviewer": reviewer,
            "reviews": stats(),
        }

    @app.get("/api/queue")
    async def queue(
        sort: str = Query("score", pattern="^(score|uncertainty)$"),
        filter: str = Query("all", pattern="^(" + "|".join(FILTERS) + ")$"),
        q: str = Query("", max_length=500),
        offset: int = Query(0, ge=0),
        limit: int = Query(50, ge=1, le=500),
    ) -> dict[str, Any]:
        decided = store.latest()
        idx = data.queue(sort, filter, q, decided)
        items = [{**data.cards[i], "regions": None, "decision": decided.get(data.cards[i]["id"])}
                 for i in idx[offset : offset + limit]]  # fmt: skip
        return {"total": len(idx), "offset": offset, "limit": limit, "items": items}

    @app.get("/api/item")
    async def item(id: str = Query(..., max_length=4096)) -> dict[str, Any]:
        if id not in data.index:
            raise ApiError(404, "not_found", f"no result with id {id!r}")
        c = data.cards[data.index[id]]
        history = store.history(id)
        return {**c, "decision": store.latest().get(id), "history": history}

    @app.post("/api/decisions")
    async def decide(request: Request) -> dict[str, Any]:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise ApiError(415, "unsupported_media_type", "send the decision as application/json")
        body = await request.body()
        if len(body) > MAX_BODY:
            raise ApiError(413, "body_too_large", f"decision body over {MAX_BODY} bytes")
        try:
            d = json.loads(body)
        except ValueError:
            raise ApiError(400, "bad_json", "body is not JSON") from None
        if not isinstance(d, dict) or d.get("id") not in data.index:
            raise ApiError(422, "invalid_request", "id must be the id of a result in this folder")
        c = data.cards[data.index[d["id"]]]
        try:
            rec = store.add(
                d["id"], d.get("decision"), reviewer=d.get("reviewer") or reviewer, label=d.get("label"),
                note=d.get("note"), mask_png=_decode_mask(d.get("mask")), model_id=data.model_id,
                score=c["score"], verdict=c["verdict"],
            )  # fmt: skip
        except ValueError as e:
            raise ApiError(422, "invalid_request", str(e)) from None
        state["changed"] = True
        data.summary = refresh_summary(data.dir, data.rows)
        return {"record": rec, "decision": store.latest().get(d["id"]), "reviews": data.summary["reviews"]}

    @app.get("/files/{rel:path}")
    async def files(rel: str) -> FileResponse:
        try:
            path = resolve_inside(data.dir, rel)
        except ValueError:
            raise ApiError(403, "forbidden", "path outside the results folder") from None
        if path.name == REVIEWS_FILE or not path.is_file():
            raise ApiError(404, "not_found", f"no file {rel!r}")
        return FileResponse(path, headers={"Cache-Control": "no-cache"})

    if token is not None:
        app.add_middleware(TokenAuth, token=token)
    else:
        app.add_middleware(LoopbackHost)
    return app
