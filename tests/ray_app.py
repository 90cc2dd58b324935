"""The real ingress app that Ray 2.60 builds, without a cluster, and a raw ASGI client.

``build_ray_app`` calls Ray's own ``ingress.init()`` (exception handling, CORS, request-id
middleware) and mounts Ray's own route table (``DEFAULT_ENDPOINTS`` plus DevIngress's admin
routes) with handlers that record that they were reached. ``call`` drives it with exact
scopes, so hostile paths and header bytes reach the app unchanged.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from fastapi import Request, WebSocket
from fastapi.responses import JSONResponse

from rayllm_auth.protect import protect_app


def ray_route_table():
    from ray.llm._internal.serve.core.ingress.dev_ingress import DEV_ENDPOINTS
    from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS

    return {**DEFAULT_ENDPOINTS, **DEV_ENDPOINTS}


def build_ray_app(reached: list, *, protect: bool = True):
    from ray.llm._internal.serve.core.ingress import ingress

    app = ingress.init()
    for name, route in ray_route_table().items():
        route(app)(_handler(name, reached))

    @app.websocket("/v1/realtime")
    async def realtime(websocket: WebSocket):
        reached.append("websocket")
        await websocket.accept()
        await websocket.send_json({"user_id": websocket.scope["state"].get("user_id")})
        await websocket.close()

    return protect_app(app) if protect else app


def bearer(key: str) -> list:
    return [("authorization", f"Bearer {key}")]


def _handler(name, reached):
    async def handler(request: Request):
        reached.append(name)
        # A Response, so Ray's response_model (e.g. ModelList) does not validate it.
        return JSONResponse({
            "reached": name, "user_id": getattr(request.state, "user_id", None),
            "credential_headers": [h for h in request.headers
                                   if h.lower() in ("authorization", "x-api-key")],
        })

    return handler


@dataclass
class Reply:
    status: int
    headers: dict = field(default_factory=dict)
    body: bytes = b""

    def json(self):
        return json.loads(self.body)


async def call(app, method="GET", path="/v1/models", headers=(), *, root_path="", body=b"",
               client=("127.0.0.1", 50000)):
    """One HTTP request as a raw ASGI scope. ``headers``: (name, value) str or bytes pairs;
    names given as str are lower-cased, as an ASGI server does, bytes are sent as they are.
    ``path`` may end in ``?query``, which becomes the scope's query string."""
    path, _, query = path.partition("?")
    raw_headers = [
        (k if isinstance(k, bytes) else k.lower().encode(),
         v if isinstance(v, (bytes, bytearray)) else v.encode("latin-1"))
        for k, v in headers
    ]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
        "root_path": root_path, "query_string": query.encode("latin-1"), "headers": raw_headers,
        "client": client, "server": ("testserver", 80),
    }
    sent_body = False
    messages = []

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)

    async def send(message):
        messages.append(message)

    await app(scope, receive, send)
    start = next(m for m in messages if m["type"] == "http.response.start")
    return Reply(
        status=start["status"],
        headers={k.decode().lower(): v.decode("latin-1") for k, v in start["headers"]},
        body=b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body"),
    )
