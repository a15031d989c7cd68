"""The Fleet gateway: the deployment's one public address, which passes on the Fleet API only.

Flower 1.42's SuperLink serves its Fleet, Control and Runtime (ServerAppIO) APIs on one HTTP
port, and its open-source build authenticates no Control request: whoever reaches that port can
register node keys, list nodes and runs, and submit an app whose code then runs on the server and
on every SuperNode. (``--control-api-address`` and ``--fleet-api-address`` are deprecated and
start the legacy gRPC servers only under internal environment variables; the 1.42 SuperNode and
``flwr`` CLI speak HTTP.) So the SuperLink binds a private address (127.0.0.1), where operators
reach it through an SSH tunnel, and this gateway listens on the public address: it serves TLS
with the SuperLink's certificate and forwards ``POST /v1/fleet/<endpoint>`` requests, headers and body
unchanged (a node's signed identity headers included, so node authentication stays the
SuperLink's), to the SuperLink over TLS verified with the deployment's CA. Every other path is
answered 404. While the SuperLink is down (a restart) it answers 502, which a SuperNode takes for
an unavailable SuperLink and retries.
"""

from __future__ import annotations

import contextlib
import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z-]*")
"""A Fleet API call: one endpoint name, no dot segments (which httpx would resolve, reaching the
Control API through ``/v1/fleet/../control/...``), no encoding. A query is not passed on."""
UPSTREAM_TIMEOUT = 600.0
"""Seconds a forwarded request may take (Fleet requests are unary: a message or an object)."""
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "upgrade", "host", "content-length"}
"""Headers that describe one connection, not the request: each side sets its own."""


def fleet_gateway(superlink: str, root_certificates: Path | None) -> Starlette:
    """The ASGI app forwarding Fleet requests to ``superlink`` (host:port): over TLS verified
    with ``root_certificates``, or plain HTTP when None (an insecure deployment)."""
    scheme = "http" if root_certificates is None else "https"
    verify: ssl.SSLContext | bool = False
    if root_certificates is not None:
        verify = ssl.create_default_context(cafile=str(root_certificates))
    client = httpx.AsyncClient(
        base_url=f"{scheme}://{superlink}", verify=verify, timeout=UPSTREAM_TIMEOUT
    )

    async def forward(request: Request) -> Response:
        path = request.scope["raw_path"].decode("latin-1")
        if request.method != "POST" or not is_fleet_call(path):
            return PlainTextResponse(
                f"{request.method} {path}: this address serves the Fleet API only", 404
            )
        try:
            upstream = await client.post(
                path,
                content=await request.body(),
                headers=without_hop_by_hop(request.headers),
            )
        except httpx.TimeoutException:
            return PlainTextResponse("the SuperLink did not answer in time", 504)
        except httpx.TransportError:
            return PlainTextResponse("the SuperLink cannot be reached", 502)
        return Response(
            upstream.content, upstream.status_code, without_hop_by_hop(upstream.headers)
        )

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with client:
            yield

    return Starlette(
        routes=[Route("/{path:path}", forward, methods=["GET", "POST", "PUT", "DELETE"])],
        lifespan=lifespan,
    )


def is_fleet_call(raw_path: str) -> bool:
    """Whether a request's raw path (as sent, before any decoding) names a Fleet API endpoint."""
    return FLEET_PATH.fullmatch(raw_path) is not None


def without_hop_by_hop(headers) -> dict[str, str]:
    """The end-to-end headers (httpx has already decoded any content encoding it names)."""
    skip = HOP_BY_HOP | {"content-encoding"}
    return {key: value for key, value in headers.items() if key.lower() not in skip}


def serve_gateway(
    listen: str,
    superlink: str,
    certfile: Path | None,
    keyfile: Path | None,
    root_certificates: Path | None,
) -> None:
    """Serve the gateway on ``listen`` (host:port) until stopped: TLS with ``certfile`` and
    ``keyfile`` (the SuperLink's certificate), or plain HTTP when both are None."""
    host, _, port = listen.rpartition(":")
    uvicorn.run(
        fleet_gateway(superlink, root_certificates),
        host=host.strip("[]"),
        port=int(port),
        ssl_certfile=None if certfile is None else str(certfile),
        ssl_keyfile=None if keyfile is None else str(keyfile),
        access_log=False,
    )
