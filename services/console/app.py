"""The ops console: a small server-rendered web app (Starlette + Jinja2, no front-end build).

It reads through the same code as the command line (services/ops/, services/ops/caseview.py)
and writes only through ops events (services/ops/actions.py) and replays
(services/ops/held.py). Filters live in the URL's query string, so a link can be shared.
Every form that changes something carries a token bound to this process, so another site
cannot make a logged-in browser post to it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Receive, Scope, Send

from services.ops import actions
from services.ops.cases import CaseFilter, explain_case, search_cases
from services.ops.caseview import case_document
from services.ops.display import span as display_span
from services.ops.held import KINDS, Selection, find_held, list_held, parse_since, replay
from services.ops.overview import overview
from shared.db.session import Database
from shared.domain import Engine
from shared.domain.timeutil import CHINA_TZ, parse_moment

TEMPLATES = Path(__file__).parent / "templates"
CASE_FILTERS = ("shop", "order", "platform", "kind", "step", "status", "overdue", "case")
HELD_FILTERS = ("reason", "key", "since")


@dataclass(frozen=True)
class ConsoleConfig:
    db: Database
    engine: Engine
    amqp_url: str
    user: str | None = None  # Basic login, if set
    password: str | None = None
    action_wait_seconds: float = 10.0
    queue_type: str = "classic"  # AFTERSALES_QUEUE_TYPE, to declare the queues alike


def local(value: str | datetime | None) -> str:
    if not value:
        return "-"
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.astimezone(CHINA_TZ).strftime("%Y-%m-%d %H:%M:%S")


def span(seconds: float | None) -> str:
    return "-" if seconds is None else display_span(seconds)


class BasicLogin:
    """HTTP Basic login against the settings' user and password (compared in constant
    time). The user name is who the ops actions are recorded as."""

    def __init__(self, app: ASGIApp, user: str, password: str) -> None:
        self.app = app
        self.user = user.encode()
        self.password = password.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") == "/healthz":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"")
        ok = False
        if given.startswith(b"Basic "):
            try:
                user, _, password = base64.b64decode(given[6:]).partition(b":")
            except (binascii.Error, ValueError):
                user, password = b"", b""
            ok = hmac.compare_digest(user, self.user) & hmac.compare_digest(password,
                                                                            self.password)
        if not ok:
            response = PlainTextResponse("login needed", status_code=401, headers={
                "WWW-Authenticate": 'Basic realm="aftersales console", charset="UTF-8"'})
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["user"] = user.decode("utf-8", "replace")
        await self.app(scope, receive, send)


def build_app(config: ConsoleConfig) -> Starlette:
    templates = Jinja2Templates(directory=str(TEMPLATES))
    templates.env.filters["local"] = local
    templates.env.filters["span"] = span
    form_secret = secrets.token_bytes(32)

    def token(request: Request) -> str:
        return hmac.new(form_secret, b"console-forms", hashlib.sha256).hexdigest()

    def user_of(request: Request) -> str | None:
        return request.scope.get("state", {}).get("user")

    def page(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
        return templates.TemplateResponse(request, name, {
            "token": token(request), "user": user_of(request), "kinds": list(KINDS), **context},
            status_code=status_code)

    async def checked_form(request: Request) -> FormData | None:
        form = await request.form()
        if not hmac.compare_digest(str(form.get("token", "")), token(request)):
            return None
        return form

    def home(request: Request) -> Response:
        return page(request, "overview.j2", data=overview(config.db, config.amqp_url,
                                                          queue_type=config.queue_type))

    def cases(request: Request) -> Response:
        q = {k: request.query_params.get(k) or None for k in CASE_FILTERS}
        overdue = {"yes": True, "no": False}.get(q["overdue"] or "")
        flt = CaseFilter(shop=q["shop"], order=q["order"], platform=q["platform"],
                         kind=q["kind"], step=q["step"], status=q["status"],
                         overdue=overdue, case_id=q["case"], limit=200)
        searched = any(q.values())
        found = search_cases(config.db, flt) if searched else []
        return page(request, "cases.j2", q=q, found=found, searched=searched)

    def case(request: Request) -> Response:
        case_id = request.path_params["case_id"]
        doc = case_document(config.db, case_id)
        if doc is None:
            return page(request, "missing.j2", status_code=404, what=f"case {case_id}")
        explained = explain_case(config.db, config.engine, case_id)
        return page(request, "case.j2", doc=doc, explained=explained, case_id=case_id,
                    done=request.query_params.get("done"))

    async def case_action(request: Request) -> Response:
        case_id = request.path_params["case_id"]
        form = await checked_form(request)
        if form is None:
            return PlainTextResponse("stale form: reload the page", status_code=403)
        action = str(form.get("action", ""))
        by = user_of(request) or str(form.get("by") or "").strip() or "console"
        until = parse_moment(str(form.get("until"))) if form.get("until") else None
        hours = float(str(form.get("hours"))) if form.get("hours") else None
        try:
            result = actions.act(config.db, config.amqp_url, action, case_id,
                                 str(form.get("reason", "")), by, until=until, hours=hours,
                                 wait_seconds=config.action_wait_seconds)
        except (actions.ActionError, ValueError) as exc:
            return page(request, "missing.j2", status_code=400, what=str(exc))
        done = f"{result.event['type']}: {result.outcome or 'published, not recorded yet'}" \
            + (f" ({result.problem})" if result.problem else "")
        return RedirectResponse(f"/cases/{case_id}?{urlencode({'done': done})}",
                                status_code=303)

    def held_selection(params: Any) -> Selection:
        since = params.get("since") or None
        return Selection(reason=params.get("reason") or None, routing_key=params.get("key") or None,
                         since=parse_since(since) if since else None)

    def held(request: Request) -> Response:
        kind = KINDS.get(request.path_params["kind"])
        if kind is None:
            return page(request, "missing.j2", status_code=404, what="no such queue")
        q = {k: request.query_params.get(k) or "" for k in HELD_FILTERS}
        try:
            selection = held_selection(q)
        except ValueError as exc:
            return page(request, "missing.j2", status_code=400, what=f"since: {exc}")
        found, total = list_held(config.amqp_url, kind, selection, limit=500,
                                 queue_type=config.queue_type)
        return page(request, "held.j2", kind=kind, q=q, found=found, total=total,
                    query=urlencode({k: v for k, v in q.items() if v}))

    def held_message(request: Request) -> Response:
        kind = KINDS.get(request.path_params["kind"])
        message = find_held(config.amqp_url, kind, request.path_params["id"],
                            config.queue_type) if kind else None
        if kind is None or message is None:
            return page(request, "missing.j2", status_code=404, what="no such message")
        return page(request, "held_message.j2", kind=kind, m=message.document())

    async def held_replay(request: Request) -> Response:
        kind = KINDS.get(request.path_params["kind"])
        form = await checked_form(request)
        if kind is None or form is None:
            return PlainTextResponse("stale form: reload the page", status_code=403)
        ids = frozenset(str(v) for v in form.getlist("id"))
        q = {k: str(form.get(k) or "") for k in HELD_FILTERS}
        base = held_selection(q)
        everything = bool(form.get("all"))
        if not ids and not everything:
            return page(request, "missing.j2", status_code=400,
                        what="select messages, or replay all that are shown")
        selection = Selection(ids=ids, reason=base.reason, routing_key=base.routing_key,
                              since=base.since, everything=everything)
        if form.get("confirm") != "yes":
            found, _total = list_held(config.amqp_url, kind, selection, limit=10_000,
                                        queue_type=config.queue_type)
            return page(request, "replay_confirm.j2", kind=kind, found=found, q=q,
                        ids=sorted(ids), everything=everything)
        report = replay(config.amqp_url, kind, selection, queue_type=config.queue_type)
        return page(request, "replay_done.j2", kind=kind, report=report)

    def healthz(_request: Request) -> Response:
        return PlainTextResponse("ok")

    middleware = []
    if config.user and config.password:
        middleware.append(Middleware(BasicLogin, user=config.user, password=config.password))
    return Starlette(routes=[
        Route("/", home),
        Route("/cases", cases),
        Route("/cases/{case_id:path}/action", case_action, methods=["POST"]),
        Route("/cases/{case_id:path}", case),
        Route("/held/{kind}", held),
        Route("/held/{kind}/replay", held_replay, methods=["POST"]),
        Route("/held/{kind}/{id}", held_message),
        Route("/healthz", healthz),
    ], middleware=middleware)
