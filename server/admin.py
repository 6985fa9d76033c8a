"""The operator's view: ``/admin`` (a page), ``GET /api/admin/runs`` and
``POST /api/admin/runs/{run_id}/cancel``.

Only tokens whose claims make them an operator get in: ``CHAT_ADMIN_CLAIM=role=operator``
names the claim and the value it must have (a list claim must contain it).  Unset,
nobody is an operator.  Everyone else — no token, a bad or expired one, a user's, one
with the claim and another value — gets 403.

The runs listed are the live ones across every process: with the in-memory broker
this process's, with Redis every process's (each process keeps the set of runs it
executes, each run its watcher count per process).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Route

from bridge.broker import RunRecord
from bridge.errors import RunNotFound
from bridge.memory import InMemoryBroker
from bridge.redis import RedisBroker
from server.auth import Principal, token_for_http
from server.errors import AuthError
from server.gateway import Gateway
from server.routes import OrjsonResponse, api, gateway_of

log = logging.getLogger("chat.admin")

ADMIN_PAGE: Final = "admin.html"
FILTERS: Final = ("user", "agent", "status")


class Forbidden(Exception):
    """Not an operator (whatever the reason: the reason stays in the log)."""


def admin_claim(claim: str | None) -> tuple[str, str] | None:
    """``"role=operator"`` as ``("role", "operator")``; None when unset."""
    if not claim:
        return None
    name, _, value = claim.partition("=")
    return name.strip(), value.strip()


def is_operator(principal: Principal, claim: str | None) -> bool:
    wanted = admin_claim(claim)
    if wanted is None:
        return False
    name, value = wanted
    have = principal.claims.get(name)
    if isinstance(have, list | tuple):
        return value in have
    return isinstance(have, str) and have == value


def operator(request: Request) -> Principal:
    """The operator the request's token names; :class:`Forbidden` for anyone else."""
    gateway = gateway_of(request)
    token = token_for_http(request.headers, request.scope.get("query_string", b""))
    try:
        principal = gateway.auth.verify(token)
    except AuthError as exc:
        gateway.counters.auth_failures += 1
        raise Forbidden(str(exc)) from None
    if not is_operator(principal, gateway.settings.admin_claim):
        raise Forbidden(f"{principal.user_id} is not an operator")
    return principal


def forbidden() -> Response:
    body = {"ok": False, "error": {"code": "forbidden", "message": "operators only"}}
    return OrjsonResponse(body, 403)


async def live_runs(gateway: Gateway) -> list[tuple[RunRecord, int, str]]:
    """Every live run with its watchers and the process that executes it."""
    broker = gateway.broker
    if isinstance(broker, InMemoryBroker):
        node = gateway.persistence.node
        return [(record, watchers, node) for record, watchers in broker.live_runs()]
    if isinstance(broker, RedisBroker):
        return await broker.live_runs()
    return []


def row(record: RunRecord, watchers: int, node: str, now: float) -> dict[str, Any]:
    return {
        "run_id": record.run_id,
        "thread_id": record.thread_id,
        "user": record.owner,
        "agent": record.agent,
        "status": record.status,
        "created_at": record.created_at,
        "age_s": round(max(now - record.created_at, 0.0), 3),
        "watchers": watchers,
        "node": node,
    }


@api
async def list_runs(request: Request) -> Response:
    """``GET /api/admin/runs?user=&agent=&status=``: the live runs, oldest first."""
    try:
        operator(request)
    except Forbidden:
        return forbidden()
    wanted = {k: v for k in FILTERS if (v := request.query_params.get(k, "").strip())}
    now = time.time()
    rows = [
        row(record, watchers, node, now)
        for record, watchers, node in await live_runs(gateway_of(request))
    ]
    rows = [r for r in rows if all(r[k] == v for k, v in wanted.items())]
    rows.sort(key=lambda r: (r["created_at"], r["run_id"]))
    return OrjsonResponse({"ok": True, "runs": rows, "count": len(rows)})


@api
async def cancel_run(request: Request) -> Response:
    """``POST /api/admin/runs/{run_id}/cancel``: cancel anyone's run."""
    try:
        who = operator(request)
    except Forbidden:
        return forbidden()
    gateway = gateway_of(request)
    run_id = request.path_params["run_id"]
    record = await gateway.broker.get_run(run_id)
    if record is None:
        raise RunNotFound(f"no run {run_id}")
    status = await gateway.broker.command(run_id, "cancel")  # to whichever process runs it
    log.warning("operator %s cancelled run %s of %s", who.user_id, run_id, record.owner)
    return OrjsonResponse({"ok": True, "run_id": run_id, "action": "cancel", "status": status})


async def admin_page(request: Request) -> Response:
    """The page itself is static: the data behind it needs an operator's token."""
    return FileResponse(Path(__file__).parent / "static" / ADMIN_PAGE)


def routes() -> list[BaseRoute]:
    return [
        Route("/admin", admin_page, methods=["GET"]),
        Route("/api/admin/runs", list_runs, methods=["GET"]),
        Route("/api/admin/runs/{run_id}/cancel", cancel_run, methods=["POST"]),
    ]
