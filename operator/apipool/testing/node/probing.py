"""Container probes as the kubelet runs them: the spec, the verdict, one probe.

:class:`ProbeSpec` reads a probe with the API's defaults and minimums;
:class:`ProbeTracker` turns single results into the kubelet's verdict
(``successThreshold`` successes in a row make it pass, ``failureThreshold``
failures in a row make it fail); :func:`run_probe` runs one ``httpGet``,
``tcpSocket`` or ``exec`` probe against a pod address with the probe's timeout.
An ``httpGet`` probe passes on a status 200-399 received within the timeout
(redirects are not followed); a refused connection or a timeout fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

__all__ = ["ProbeSpec", "ProbeTracker", "port_number", "run_probe"]


@dataclasses.dataclass(frozen=True)
class ProbeSpec:
    kind: str
    """``startup``, ``liveness`` or ``readiness``."""
    action: Mapping[str, Any]
    """The ``httpGet``, ``tcpSocket`` or ``exec`` member, with its key."""
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3
    kill_grace: float | None = None
    """The probe-level ``terminationGracePeriodSeconds`` (startup and liveness)."""

    @classmethod
    def from_api(cls, kind: str, probe: Mapping[str, Any]) -> ProbeSpec:
        action = {k: probe[k] for k in ("httpGet", "tcpSocket", "exec", "grpc") if k in probe}
        if len(action) != 1:
            raise ValueError(f"{kind} probe needs exactly one action, got {sorted(action)}")
        success = max(1, int(probe.get("successThreshold", 1)))
        if kind != "readiness":
            success = 1  # the API requires 1 for liveness and startup
        grace = probe.get("terminationGracePeriodSeconds")
        return cls(
            kind=kind,
            action=action,
            initial_delay=max(0.0, float(probe.get("initialDelaySeconds", 0))),
            period=max(1.0, float(probe.get("periodSeconds", 10))),
            timeout=max(1.0, float(probe.get("timeoutSeconds", 1))),
            success_threshold=success,
            failure_threshold=max(1, int(probe.get("failureThreshold", 3))),
            kill_grace=None if grace is None or kind == "readiness" else float(grace),
        )


@dataclasses.dataclass
class ProbeTracker:
    """Consecutive results of one probe and the verdict they make."""

    spec: ProbeSpec
    passing: bool | None = None
    """None until the first verdict."""
    successes: int = 0
    failures: int = 0

    def record(self, ok: bool) -> bool | None:
        """Count one result; return the new verdict when it changed, else None."""
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.passing is not True and self.successes >= self.spec.success_threshold:
                self.passing = True
                return True
        else:
            self.successes, self.failures = 0, self.failures + 1
            if self.passing is not False and self.failures >= self.spec.failure_threshold:
                self.passing = False
                return False
        return None


def port_number(port: Any, ports: Sequence[Mapping[str, Any]]) -> int:
    """A probe's ``port``: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    if isinstance(port, str) and port.isascii() and port.isdigit():
        return int(port)
    for item in ports:
        if item.get("name") == port:
            return int(item["containerPort"])
    raise ValueError(f"the container has no port named {port!r}")


async def _http_get(
    action: Mapping[str, Any], address: str, ports: Sequence[Mapping[str, Any]], timeout: float
) -> bool:
    host = action.get("host") or address
    port = port_number(action.get("port"), ports)
    scheme = str(action.get("scheme", "HTTP")).lower()
    path = action.get("path") or "/"
    headers = {h["name"]: h["value"] for h in action.get("httpHeaders") or []}
    headers.setdefault("User-Agent", "kube-probe/1.31")
    hostpart = f"[{host}]" if ":" in host else host
    url = f"{scheme}://{hostpart}:{port}{path}"
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    try:
        async with (
            aiohttp.ClientSession(timeout=client_timeout) as session,
            session.get(url, headers=headers, allow_redirects=False, ssl=False) as response,
        ):
            await response.read()
            return 200 <= response.status < 400
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
        return False


async def _tcp(
    action: Mapping[str, Any], address: str, ports: Sequence[Mapping[str, Any]], timeout: float
) -> bool:
    port = port_number(action.get("port"), ports)
    try:
        async with asyncio.timeout(timeout):  # not wait_for: see apipool.waiting
            _, writer = await asyncio.open_connection(action.get("host") or address, port)
    except (TimeoutError, OSError):
        return False
    writer.close()
    return True


async def _exec(action: Mapping[str, Any], prefix: Sequence[str], timeout: float) -> bool:
    command = [str(c) for c in action.get("command") or []]
    if not command:
        return False
    try:
        proc = await asyncio.create_subprocess_exec(
            *prefix,
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return False
    try:
        async with asyncio.timeout(timeout):
            return await proc.wait() == 0
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return False


async def run_probe(
    spec: ProbeSpec,
    address: str,
    ports: Sequence[Mapping[str, Any]],
    exec_prefix: Sequence[str] = (),
) -> bool:
    """One probe of a container at ``address`` (its pod's IP); True if it passed.
    ``exec`` probes run their command with ``exec_prefix`` (entering the pod's
    network namespace)."""
    action = spec.action
    if "httpGet" in action:
        return await _http_get(action["httpGet"], address, ports, spec.timeout)
    if "tcpSocket" in action:
        return await _tcp(action["tcpSocket"], address, ports, spec.timeout)
    if "exec" in action:
        return await _exec(action["exec"], exec_prefix, spec.timeout)
    return False  # grpc probes are not run by this node
