"""HTTP-level limits applied before Gradio sees a request."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from .limits import MAX_URL_LENGTH

__all__ = ["URLLengthLimit"]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class URLLengthLimit:
    """ASGI middleware: a request whose path and query together exceed `MAX_URL_LENGTH` bytes is answered with
    414 URI Too Long (a page link such as ``/?tab=...`` with a huge value would otherwise fail inside Gradio with a
    server error)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") in ("http", "websocket"):
            length = len(scope.get("raw_path") or scope.get("path", "").encode()) + len(scope.get("query_string", b""))
            if length > MAX_URL_LENGTH:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1009})
                    return
                body = f"URI too long: at most {MAX_URL_LENGTH} bytes of path and query.".encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 414,
                        "headers": [
                            (b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
