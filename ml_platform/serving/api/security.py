"""The API's guards: an optional bearer token and a request body size limit.

- Token (ML_PLATFORM_API_TOKEN, `Settings.api_token`): once set, the mutating endpoints
  (POST /feedback, POST /feedback/batch) answer 401 without `Authorization: Bearer <token>`; with
  `ServingConfig.auth_scope="all"` the scoring and read endpoints too. Health and /metrics stay
  open (load balancers and Prometheus probe them). Unset: no endpoint asks for one.
- Body size (`ServingConfig.max_body_bytes`): a larger body is refused with 413 before it is read
  (Content-Length), or as soon as a streamed body passes the limit.
"""

from __future__ import annotations

import hmac
import json

from fastapi import HTTPException, Request

AUTH_SCOPES = ("mutating", "all")


def _check(request: Request, *, mutating: bool) -> None:
    token: str | None = request.app.state.api_token
    if token is None or (not mutating and request.app.state.auth_scope != "all"):
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(
            status_code=401,
            detail={"error": "unauthorized", "message": "this endpoint needs the header Authorization: Bearer <token>"
                    " (the API's ML_PLATFORM_API_TOKEN)"},
            headers={"WWW-Authenticate": "Bearer"},
        )


async def require_write_token(request: Request) -> None:
    """Dependency of the mutating endpoints."""
    _check(request, mutating=True)


async def require_read_token(request: Request) -> None:
    """Dependency of the scoring and read endpoints (a token is asked only with auth_scope="all")."""
    _check(request, mutating=False)


class BodyLimitMiddleware:
    """413 for a request body over `max_bytes` (plain ASGI, like HttpMetricsMiddleware)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, send, size: str) -> None:
        body = json.dumps({
            "error": "payload_too_large",
            "message": f"the request body is {size} bytes; this API accepts at most {self.max_bytes} "
                       f"(ServingConfig.max_body_bytes)",
        }).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await self._refuse(send, str(declared))
                    return
        received = 0
        started = refused = False

        async def counting_receive():
            # Past the limit: answer 413 here and tell the app the client left (an exception raised
            # here would become the framework's 400 "error parsing the body").
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    if not started:
                        await self._refuse(send, f"more than {self.max_bytes}")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if refused:
                return  # the 413 was the answer
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not refused:
                raise
