"""`InProcessClient`: a synchronous client of an app in this process (tests, notebooks), with the
app's lifespan run as a server would run it. Built on httpx's own ASGI transport in an anyio
blocking portal, like Starlette's TestClient, but without its deprecated httpx binding."""

from __future__ import annotations

import contextlib
from typing import Any, Self

import httpx
from anyio.from_thread import BlockingPortal, start_blocking_portal


class InProcessClient:
    """`with InProcessClient(app) as client: client.post("/predict", json=...)`.

    The app's startup runs on entry and its shutdown on exit, in the portal's event loop thread,
    which also runs every request; `portal.call(coroutine_function, *args)` runs more code there
    (e.g. `client.portal.call(state.log.flush, 5.0)`)."""

    def __init__(self, app: Any, base_url: str = "http://testserver", timeout: float = 30.0):
        self.app = app
        self.base_url = base_url
        self.timeout = timeout
        self.portal: BlockingPortal | None = None
        self._stack: contextlib.ExitStack | None = None
        self._client: httpx.AsyncClient | None = None

    def __enter__(self) -> Self:
        stack = contextlib.ExitStack()
        try:
            self.portal = stack.enter_context(start_blocking_portal())
            stack.enter_context(self.portal.wrap_async_context_manager(self.app.router.lifespan_context(self.app)))
            self._client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=self.app), base_url=self.base_url, timeout=self.timeout
            )
            stack.callback(self.portal.call, self._client.aclose)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc: object) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        if self._client is None or self.portal is None:
            raise RuntimeError("InProcessClient is not started: use it as `with InProcessClient(app) as c:`")
        return self.portal.call(lambda: self._client.request(method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)
