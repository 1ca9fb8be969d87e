"""The HTTP server under the app: uvicorn with h11, header and idle deadlines, and the bind-address rule.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but starts no clock while a request's
headers trickle in, so a client sending one byte every few seconds would hold its connection for ever.
``DeadlineH11Protocol`` gives every request ``read_timeout_s`` to complete its headers (from the connection,
or from its first byte on a kept-alive one), then answers 408 and closes. The body has the same deadline in
the app (``uploads.read_body``). Headers are capped at 16 KiB (h11).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_HEADER_BYTES = 16 * 1024
KEEP_ALIVE_S = 5.0
_BODY_408 = json.dumps({"error": {"code": "request_timeout", "message": "headers not received in time"}})
_TIMEOUT_408 = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_BODY_408), _BODY_408.encode())
)


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request's headers (``read_timeout_s``)."""

    read_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self._header_timer is None:
                self._arm()  # the first bytes of the next request on a kept-alive connection
        else:
            self._disarm()  # headers complete (body, if any, is the app's to time)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.read_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self.conn.our_state is h11.IDLE:  # nothing sent on this request yet: say why we close
                self.transport.write(_TIMEOUT_408)
            self.transport.close()


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, ``localhost``)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def make_server(
    app: Any, host: str, port: int, *, read_timeout_s: float, graceful_s: float, verbose: bool
) -> uvicorn.Server:
    """A uvicorn server for ``app`` with the deadlines above (one process, h11)."""
    protocol = type("DeadlineH11Protocol", (DeadlineH11Protocol,), {"read_timeout_s": read_timeout_s})
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        timeout_keep_alive=int(KEEP_ALIVE_S),
        log_level="info" if verbose else "warning",
        access_log=verbose,
        timeout_graceful_shutdown=graceful_s,  # type: ignore[arg-type]  # any number works
    )
    return uvicorn.Server(config)
