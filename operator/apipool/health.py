"""A slot's probe and metrics endpoints over HTTP: ``/healthz``, ``/readyz``, ``/metrics``.

:class:`HealthServer` knows nothing of slots: it serves two callables that
return ``(ok, reason)`` and a Prometheus registry. Guarantees:

- ``GET /healthz`` and ``GET /readyz`` call their check on every request and
  answer 200 when it passes, 503 when it fails, with a JSON body
  ``{"ok": ..., "reason": ..., **info}`` (``info``: e.g. the pool and slot);
- ``GET /metrics`` answers the registry in the Prometheus text format, with its
  content type;
- no access log, no signal handlers of its own; :meth:`HealthServer.stop`
  closes the listening socket;
- host ``::`` listens on every IPv6 and IPv4 address (one dual-stack socket),
  or on every IPv4 address where IPv6 is unavailable; any other host is bound
  as it is.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

Check = Callable[[], tuple[bool, str]]
ANY_HOST = "::"


def dual_stack_socket(port: int) -> socket.socket:
    """A listening TCP socket on every address: IPv6 and IPv4 mapped when the
    host has IPv6, else IPv4 alone."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        return _bound(socket.socket(socket.AF_INET, socket.SOCK_STREAM), ("0.0.0.0", port))
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        return _bound(sock, ("::", port))
    except OSError:
        sock.close()
        return _bound(socket.socket(socket.AF_INET, socket.SOCK_STREAM), ("0.0.0.0", port))


def listening_socket(host: str, port: int) -> socket.socket:
    """The listening socket a server on ``host:port`` uses (``::``: dual stack).
    Made before a fork, it lets a keeper's children serve in turn on one port."""
    if host == ANY_HOST:
        return dual_stack_socket(port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return _bound(socket.socket(family, socket.SOCK_STREAM), (host, port))


def _bound(sock: socket.socket, address: tuple[str, int]) -> socket.socket:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class HealthServer:
    """Serves ``health`` on /healthz, ``readiness`` on /readyz and ``registry`` on /metrics."""

    def __init__(
        self,
        *,
        health: Check,
        readiness: Check,
        registry: CollectorRegistry,
        info: Mapping[str, object] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        sock: socket.socket | None = None,
    ) -> None:
        self.health = health
        self.readiness = readiness
        self.registry = registry
        self.info = dict(info or {})
        self.host = host
        self._requested_port = port
        self._sock = sock
        """A listening socket made beforehand (host and port then unused)."""
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def port(self) -> int | None:
        """The port it listens on once started (the one picked when 0 was asked)."""
        return self._port

    def _probe(self, check: Check) -> web.Response:
        ok, reason = check()
        return web.json_response(
            {"ok": ok, "reason": reason, **self.info}, status=200 if ok else 503
        )

    async def _healthz(self, _: web.Request) -> web.Response:
        return self._probe(self.health)

    async def _readyz(self, _: web.Request) -> web.Response:
        return self._probe(self.readiness)

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> int | None:
        """Listen on host:port; returns the port."""
        if self._runner is not None:
            raise RuntimeError("HealthServer is already started")
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            if self._sock is not None:
                await web.SockSite(runner, self._sock).start()
            elif self.host == ANY_HOST:
                sock = dual_stack_socket(self._requested_port)
                await web.SockSite(runner, sock).start()
            else:
                await web.TCPSite(runner, self.host, self._requested_port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        addresses = runner.addresses
        self._port = int(addresses[0][1]) if addresses else None
        return self._port

    async def stop(self) -> None:
        """Stop listening (a no-op when not started)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
