"""Which URLs, and which addresses behind them, the ``http`` handler may call.

- **Allow-list.** With ``--allow-url`` prefixes, a URL must fall under one of
  them. Both sides are compared normalised: scheme, lower-case host (IDNA, no
  trailing dot), port (80/443 when absent), and the path as it is sent (dot
  segments resolved, percent-escapes normalised). The host and port must be
  equal, not a string prefix (``http://api.example.com.evil/`` and
  ``http://api.example.com@evil/`` name other hosts); a prefix path ending in
  ``/`` matches what starts with it, any other prefix path matches itself and
  what continues it after a ``/`` (``/v1`` matches ``/v1`` and ``/v1/x``, not
  ``/v10``).
- **Addresses.** A host no prefix names explicitly must be public: every
  address it resolves to (or the address it is) must be globally routable.
  Loopback, private (RFC 1918, fc00::/7), link-local (169.254/16 with the cloud
  metadata address, fe80::/10), unspecified, multicast, reserved and other
  non-global addresses are refused, also when embedded in an IPv6 address
  (IPv4-mapped, 6to4, NAT64). Names are checked by :class:`CheckedResolver`,
  which sits in the connector: the addresses it lets through are the only ones
  the connection is made to, so a name cannot resolve one way for the check and
  another way for the connection.

Every refusal raises :class:`UrlRefused` (a :class:`PermanentError`) before any
connection is made; its message carries the URL redacted.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from .errors import ConfigError, PermanentError
from .redact import redact_url

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Origin = tuple[str, str, int]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_METADATA = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)


class UrlRefused(PermanentError):
    """The policy forbids this URL or the address it leads to."""


def host_key(url: URL) -> str:
    """The host as compared: lower-case, IDNA-encoded, without a trailing dot."""
    return (url.raw_host or "").lower().rstrip(".")


def origin(url: URL) -> Origin:
    """Scheme, host and port: what credentials are bound to."""
    return url.scheme, host_key(url), url.port or 0


def ip_literal(host: str) -> IPAddress | None:
    """``host`` as an IP address (an IPv6 zone is ignored), or None for a name."""
    try:
        return ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_kind(ip: IPAddress) -> str | None:
    """None for a public address; otherwise what kind of address it is."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            kind = address_kind(inner)
            return f"{kind} (embedded)" if kind else None
    if ip in _METADATA:
        return "link-local (cloud metadata)"
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
        ("non-public", not ip.is_global),
    )
    return next((kind for kind, hit in checks if hit), None)


@dataclass(frozen=True)
class AllowedPrefix:
    """One ``--allow-url`` prefix, normalised."""

    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, text: str) -> AllowedPrefix:
        try:
            url = URL(text)
            port = url.port
        except ValueError:
            raise ConfigError(f"allowed URL {text!r} is not a valid URL") from None
        if url.scheme not in ("http", "https") or not url.raw_host or not port:
            raise ConfigError(f"allowed URL {text!r} needs http:// or https://, a host and a port")
        if url.user is not None or url.password is not None:
            raise ConfigError(f"allowed URL {text!r} must not contain credentials")
        if url.query_string or url.fragment or "?" in text or "#" in text:
            raise ConfigError(f"allowed URL {text!r} must not have a query or a fragment")
        return cls(url.scheme, host_key(url), port, url.raw_path or "/")

    def matches(self, url: URL) -> bool:
        if origin(url) != (self.scheme, self.host, self.port):
            return False
        path = url.raw_path or "/"
        if self.path.endswith("/"):
            return path.startswith(self.path)
        return path == self.path or path.startswith(self.path + "/")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


class UrlPolicy:
    """The allow-list and the address rules of one pool (``HttpPolicy.allow_urls``)."""

    def __init__(self, allow_urls: Iterable[str] = ()) -> None:
        self.prefixes = tuple(AllowedPrefix.parse(p) for p in allow_urls)
        self.explicit_hosts = frozenset(p.host for p in self.prefixes)

    def check(self, url: URL) -> None:
        """Refuse ``url`` unless the allow-list admits it and, for a host the
        allow-list does not name, unless an IP-address host is public (names
        are checked when they resolve, by :class:`CheckedResolver`)."""
        if self.prefixes and not any(p.matches(url) for p in self.prefixes):
            allowed = ", ".join(str(p) for p in self.prefixes)
            raise UrlRefused(f"{redact_url(str(url))} is not under an allowed URL ({allowed})")
        host = host_key(url)
        if host in self.explicit_hosts:
            return
        ip = ip_literal(host)
        kind = address_kind(ip) if ip is not None else None
        if kind:
            raise UrlRefused(
                f"{redact_url(str(url))}: {ip} is a {kind} address; "
                "refused unless an allowed URL (--allow-url) names it"
            )

    def check_addresses(self, host: str, addresses: Iterable[str]) -> None:
        """Refuse a name one of whose resolved addresses is not public (unless
        the allow-list names the host)."""
        name = host.lower().rstrip(".")
        if name in self.explicit_hosts:
            return
        for address in addresses:
            ip = ip_literal(address)
            kind = address_kind(ip) if ip is not None else "unparsable"
            if kind:
                raise UrlRefused(
                    f"host {name!r} resolves to {address}, a {kind} address; "
                    "refused unless an allowed URL (--allow-url) names the host"
                )


class CheckedResolver(AbstractResolver):
    """A resolver that lets through only addresses the policy accepts: the
    connector connects to what it returns and to nothing else."""

    def __init__(self, policy: UrlPolicy, inner: AbstractResolver) -> None:
        self._policy = policy
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        self._policy.check_addresses(host, [entry["host"] for entry in found])
        return found

    async def close(self) -> None:
        await self._inner.close()
