"""The built-in http handler against real aiohttp servers on 127.0.0.1.

Nothing here connects anywhere but loopback: addresses that must be refused are
either IP literals (refused before any connection) or made-up ``.test`` names
that a fake resolver maps to them, and every connection goes through a socket
factory that records it and raises for anything but loopback.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import resource
import socket
import time
from collections.abc import AsyncIterator, Callable
from email.utils import formatdate
from typing import Any
from urllib.parse import urlencode

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from apipool.errors import ConfigError, PermanentError, RetryAfter
from apipool.handlers import Call, load_handler, load_handlers
from apipool.http_handler import (
    HttpCallError,
    HttpHandler,
    HttpPayloadError,
    ResponseTooLarge,
    UrlRefused,
    close_http_session,
    parse_http_request,
)
from apipool.settings import HttpPolicy, Limits
from apipool.testing.polling import async_wait_for
from apipool.url_policy import CheckedResolver, UrlPolicy, address_kind

pytestmark = pytest.mark.timeout(60)

CALL = Call(job_id="job-1", attempt=1, pool="p", slot=0, deadline=None, timeout=10.0)
SECRET = "s3cr3t-value"
CREDENTIALS = {"Authorization": f"Bearer {SECRET}", "Cookie": f"sid={SECRET}", "X-Api-Key": SECRET}
CHUNK = b"x" * 65536
TABLE = {
    "internal.test": ["10.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "mixed.test": ["93.184.216.34", "10.0.0.1"],
    "v6local.test": ["fe80::1"],
    "loop.test": ["127.0.0.1"],
    "api.test": ["127.0.0.1"],
    "public.test": ["93.184.216.34"],
}


class FakeResolver(AbstractResolver):
    """Resolves the made-up names of TABLE; records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        if host not in TABLE:
            raise OSError(f"{host} is not in the test's table")
        return [
            ResolveResult(
                hostname=host,
                host=a,
                port=port,
                family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for a in TABLE[host]
        ]

    async def close(self) -> None:
        pass


class Net:
    """The fake resolver and a socket factory that allows loopback only."""

    def __init__(self) -> None:
        self.resolver = FakeResolver()
        self.connects: list[str] = []

    def socket_factory(self, addr_info: Any) -> socket.socket:
        family, kind, proto, _, sockaddr = addr_info
        self.connects.append(sockaddr[0])
        if not ipaddress.ip_address(sockaddr[0]).is_loopback:
            raise AssertionError(f"the handler tried to connect to {sockaddr[0]}")
        return socket.socket(family, kind, proto)


class Api:
    """An aiohttp server on 127.0.0.1 that records what it is sent."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.sent = 0
        self.stopped = False
        self.base = ""

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.seen.append({"path": request.path, "headers": dict(request.headers), "peer": peer})
        response: web.StreamResponse = await handler(request)
        return response

    async def start(self) -> None:
        app = web.Application(middlewares=[self._record])
        app.router.add_route("*", "/echo", self.echo)
        app.router.add_route("*", "/v1/echo", self.echo)
        app.router.add_route("*", "/redirect/{code}", self.redirect)
        app.router.add_get("/chain/{n}", self.chain)
        app.router.add_get("/set-cookie", self.set_cookie)
        app.router.add_get("/status/{code}", self.status)
        app.router.add_get("/big", self.big)
        app.router.add_get("/endless", self.endless)
        app.router.add_get("/slow", self.slow)
        self.runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=2.0, handler_cancellation=True
        )
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]
        self.base = f"http://127.0.0.1:{self.port}"

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.text()
        doc = {"method": request.method, "headers": dict(request.headers), "body": body}
        return web.json_response(doc)

    async def redirect(self, request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        return web.Response(status=code, headers={"Location": request.query["to"]}, text="moved")

    async def chain(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        if n > 0:
            return web.Response(status=302, headers={"Location": f"/chain/{n - 1}"})
        return web.Response(text="done")

    async def set_cookie(self, request: web.Request) -> web.Response:
        response = web.Response(text="set")
        response.set_cookie("session", "job-a-cookie")
        return response

    async def status(self, request: web.Request) -> web.Response:
        text = f'upstream unavailable {{"Authorization": "Bearer {SECRET}"}}'
        said = request.query.get("retry_after")
        headers = {} if said is None else {"Retry-After": said}
        return web.Response(status=int(request.match_info["code"]), text=text, headers=headers)

    async def big(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(100 << 20)})
        return await self._stream(request, response, chunks=1600)  # 100 MiB

    async def endless(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        return await self._stream(request, response, chunks=100_000)  # "endless": 6 GiB

    async def _stream(
        self, request: web.Request, response: web.StreamResponse, chunks: int
    ) -> web.StreamResponse:
        try:
            await response.prepare(request)
            for _ in range(chunks):
                await response.write(CHUNK)
                self.sent += len(CHUNK)
        except ConnectionError:
            pass  # the client hung up: what the test wants
        finally:
            self.stopped = True
        return response

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(5)  # the server being slow, not the test waiting
        return web.Response(text="late")

    async def close(self) -> None:
        await self.runner.cleanup()


@pytest_asyncio.fixture
async def api() -> AsyncIterator[Api]:
    server = Api()
    await server.start()
    yield server
    await server.close()


@pytest_asyncio.fixture
async def other() -> AsyncIterator[Api]:
    server = Api()
    await server.start()
    yield server
    await server.close()


Make = Callable[..., HttpHandler]


@pytest_asyncio.fixture
async def net() -> AsyncIterator[Net]:
    network = Net()
    yield network
    assert all(ipaddress.ip_address(a).is_loopback for a in network.connects), network.connects


@pytest_asyncio.fixture
async def make(net: Net) -> AsyncIterator[Make]:
    made: list[HttpHandler] = []

    def build(
        *allow: str, follow: bool = False, redact: tuple[str, ...] = (), max_bytes: int = 1 << 20
    ) -> HttpHandler:
        policy = HttpPolicy(allow_urls=allow, follow_redirects=follow, redact_headers=redact)
        handler = HttpHandler(
            policy,
            Limits(max_response_bytes=max_bytes),
            resolver=net.resolver,
            socket_factory=net.socket_factory,
        )
        made.append(handler)
        return handler

    yield build
    for handler in made:
        await handler.aclose()


def get(url: str, **fields: Any) -> dict[str, Any]:
    return {"method": "GET", "url": url, **fields}


# -- the allow-list and the address rules -----------------------------------------


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://api.test:8080/v1/charges", True),
        ("HTTP://API.Test:8080/v1/charges?x=1", True),
        ("http://api.test.:8080/v1/x", True),
        ("http://api.test:8080/v1/", True),
        ("http://api.test:8080/v1", False),
        ("http://api.test:8080/v10/x", False),
        ("http://api.test:8080/v1/../admin", False),
        ("http://api.test:8080/v1/%2e%2e/admin", False),
        ("http://api.test.evil:8080/v1/x", False),
        ("http://api.test:8080@evil.test:8080/v1/x", False),
        ("http://evil.test/?http://api.test:8080/v1/", False),
        ("https://api.test:8080/v1/x", False),
        ("http://api.test:8081/v1/x", False),
        ("http://api.test/v1/x", False),
    ],
)
def test_allow_list_compares_normalised_urls(url: str, allowed: bool) -> None:
    policy = UrlPolicy(["http://api.test:8080/v1/"])
    if allowed:
        policy.check(URL(url))
    else:
        with pytest.raises(UrlRefused, match="not under an allowed URL"):
            policy.check(URL(url))


def test_a_prefix_without_a_trailing_slash_ends_at_a_path_segment() -> None:
    policy = UrlPolicy(["http://api.test/v1"])
    for ok in ("http://api.test/v1", "http://api.test/v1/x", "http://api.test:80/v1?q=1"):
        policy.check(URL(ok))
    with pytest.raises(UrlRefused):
        policy.check(URL("http://api.test/v10"))


@pytest.mark.parametrize(
    "prefix", ["http://h/?q=1", "http://h/#f", "http://user:pw@h/", "http:///x", "http://h:99999/"]
)
def test_bad_allowed_urls_are_configuration_errors(prefix: str) -> None:
    with pytest.raises(ConfigError, match="allowed URL"):
        load_handler("http", http=HttpPolicy(allow_urls=(prefix,)))


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("169.254.169.254", "link-local (cloud metadata)"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "non-public"),
        ("::ffff:127.0.0.1", "loopback (embedded)"),
        ("2002:a00:1::", "private (embedded)"),
        ("64:ff9b::a9fe:a9fe", "link-local (cloud metadata) (embedded)"),
        ("93.184.216.34", None),
        ("2606:4700::1", None),
    ],
)
def test_address_kinds(address: str, kind: str | None) -> None:
    assert address_kind(ipaddress.ip_address(address)) == kind


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://192.168.0.1:8080/x",
        "http://[::1]/",
        "http://[fe80::1]/",
        "http://[::ffff:169.254.169.254]/",
        "http://0.0.0.0/",
        "http://224.0.0.1/",
        "http://internal.test/",
        "http://metadata.test/latest/meta-data/",
        "http://mixed.test/",
        "http://v6local.test/",
        "http://loop.test/",
    ],
)
async def test_non_public_addresses_are_refused_before_any_connection(
    make: Make, net: Net, url: str
) -> None:
    with pytest.raises(UrlRefused, match="address"):
        await make()(get(url), CALL)
    assert net.connects == []


@pytest.mark.asyncio
@pytest.mark.parametrize("url", ["http://2130706433/", "http://127.1/", "http://0x7f.0.0.1/"])
async def test_numeric_host_spellings_are_invalid(make: Make, net: Net, url: str) -> None:
    with pytest.raises(HttpPayloadError, match="invalid host"):
        await make()(get(url), CALL)
    assert net.connects == []
    assert net.resolver.asked == []


@pytest.mark.asyncio
async def test_the_resolver_passes_public_addresses(net: Net) -> None:
    resolver = CheckedResolver(UrlPolicy(), net.resolver)
    found = await resolver.resolve("public.test", 443)
    assert [entry["host"] for entry in found] == ["93.184.216.34"]
    with pytest.raises(UrlRefused, match=r"'internal\.test' resolves to 10\.0\.0\.1, a private"):
        await resolver.resolve("internal.test", 443)


@pytest.mark.asyncio
async def test_loopback_is_refused_unless_allowed_explicitly(make: Make, api: Api) -> None:
    with pytest.raises(UrlRefused, match="loopback"):
        await make()(get(f"{api.base}/echo"), CALL)
    assert api.seen == []
    result = await make(f"{api.base}/")(get(f"{api.base}/echo"), CALL)
    assert result["status"] == 200


@pytest.mark.asyncio
async def test_an_allowed_name_may_resolve_to_loopback(make: Make, api: Api, net: Net) -> None:
    handler = make(f"http://api.test:{api.port}/v1/")
    result = await handler(get(f"http://API.test:{api.port}/v1/echo"), CALL)
    assert result["status"] == 200
    assert api.seen[-1]["headers"]["Host"] == f"api.test:{api.port}"
    tricks = [
        f"http://api.test:{api.port}/v10/echo",
        f"http://api.test:{api.port}/v1/../echo",
        f"http://api.test:{api.port}@loop.test:{api.port}/v1/echo",
        f"http://api.test.loop.test:{api.port}/v1/echo",
        f"http://127.0.0.1:{api.port}/v1/echo",
    ]
    for url in tricks:
        with pytest.raises(UrlRefused, match="not under an allowed URL"):
            await handler(get(url), CALL)
    assert len(api.seen) == 1
    assert net.resolver.asked == ["api.test"]


# -- redirects, cookies, connections ----------------------------------------------


@pytest.mark.asyncio
async def test_redirects_are_answers_by_default(make: Make, api: Api, other: Api) -> None:
    url = f"{api.base}/redirect/302?to={other.base}/echo"
    result = await make(f"{api.base}/", f"{other.base}/")(get(url), CALL)
    assert result["status"] == 302
    assert result["headers"]["Location"] == f"{other.base}/echo"
    assert result["body"] == "moved"
    assert other.seen == []


@pytest.mark.asyncio
async def test_credentials_never_follow_a_redirect_to_another_origin(
    make: Make, api: Api, other: Api
) -> None:
    handler = make(f"{api.base}/", f"{other.base}/", follow=True, redact=("X-Custom-Token",))
    headers = {**CREDENTIALS, "X-Custom-Token": SECRET, "Accept": "application/json"}
    back = f"{api.base}/echo"
    url = f"{api.base}/redirect/307?to={other.base}/redirect/302%3Fto%3D{back}"
    result = await handler(get(url, headers=headers), CALL)
    assert result["status"] == 200
    assert [s["path"] for s in api.seen + other.seen] == ["/redirect/307", "/echo", "/redirect/302"]
    assert SECRET in str(api.seen[0]["headers"])
    for seen in (other.seen[0], api.seen[1]):  # dropped, and not restored back home
        assert SECRET not in str(seen["headers"])
        assert seen["headers"]["Accept"] == "application/json"
        assert seen["headers"]["Idempotency-Key"] == "job-1"


@pytest.mark.asyncio
async def test_same_origin_redirects_keep_credentials_and_the_method(make: Make, api: Api) -> None:
    handler = make(f"{api.base}/", follow=True)
    payload = {"method": "POST", "url": f"{api.base}/redirect/307?to=/echo", "body": {"a": 1}}
    result = await handler({**payload, "headers": CREDENTIALS}, CALL)
    echoed = json.loads(result["body"])
    assert (echoed["method"], echoed["body"]) == ("POST", '{"a": 1}')
    assert echoed["headers"]["Authorization"] == f"Bearer {SECRET}"
    see_other = {**payload, "url": f"{api.base}/redirect/303?to=/echo"}
    echoed = json.loads((await handler(see_other, CALL))["body"])
    assert (echoed["method"], echoed["body"]) == ("GET", "")


@pytest.mark.asyncio
async def test_at_most_five_redirects_each_checked(make: Make, api: Api) -> None:
    handler = make(f"{api.base}/", follow=True)
    assert (await handler(get(f"{api.base}/chain/5"), CALL))["body"] == "done"
    with pytest.raises(UrlRefused, match="more than 5 redirects"):
        await handler(get(f"{api.base}/chain/6"), CALL)
    for to in ("http://169.254.169.254/latest/meta-data/", "http://internal.test/", "ftp://x/"):
        with pytest.raises(UrlRefused):
            await handler(get(f"{api.base}/redirect/302?to={to}"), CALL)


@pytest.mark.asyncio
async def test_no_cookie_passes_from_one_job_to_the_next(make: Make, api: Api) -> None:
    base = f"http://api.test:{api.port}"  # a name: a cookie jar keeps no cookie of an IP
    handler = make(f"{base}/", follow=True)
    first = await handler(get(f"{base}/set-cookie"), CALL)
    assert "job-a-cookie" in first["headers"]["Set-Cookie"]
    await handler(get(f"{base}/echo"), CALL)
    await handler(get(f"{base}/redirect/302?to=/echo"), CALL)
    assert [s["path"] for s in api.seen] == ["/set-cookie", "/echo", "/redirect/302", "/echo"]
    assert all("Cookie" not in s["headers"] for s in api.seen)


@pytest.mark.asyncio
async def test_one_connection_is_kept_alive_between_calls(make: Make, api: Api) -> None:
    handler = make(f"{api.base}/")
    for _ in range(3):
        await handler(get(f"{api.base}/echo"), CALL)
    assert len({s["peer"] for s in api.seen}) == 1


@pytest.mark.asyncio
async def test_5xx_are_retried_errors(make: Make, api: Api) -> None:
    handler = make(f"{api.base}/")
    for code in (500, 502, 503):
        with pytest.raises(HttpCallError, match=f"HTTP {code} from") as caught:
            await handler(get(f"{api.base}/status/{code}"), CALL)
        assert not isinstance(caught.value, PermanentError)
    assert (await handler(get(f"{api.base}/status/404"), CALL))["status"] == 404


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("code", "said", "seconds"),
    [
        (429, None, None),  # no Retry-After: the job backs off
        (429, "7", 7.0),
        (429, "0", 0.0),
        (429, "soon", None),  # unreadable: as if absent
        (429, "-3", None),
        (429, "Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # a date in the past: now
        (503, "12", 12.0),  # 503 with Retry-After: the API asks to wait
    ],
)
async def test_429_and_503_with_retry_after_say_slow_down(
    make: Make, api: Api, code: int, said: str | None, seconds: float | None
) -> None:
    """Not a failed attempt: RetryAfter with the seconds the API asked for."""
    handler = make(f"{api.base}/")
    query = "" if said is None else "?" + urlencode({"retry_after": said})
    with pytest.raises(RetryAfter, match=f"HTTP {code} from") as caught:
        await handler(get(f"{api.base}/status/{code}{query}"), CALL)
    assert caught.value.seconds == seconds
    assert SECRET not in str(caught.value)


@pytest.mark.asyncio
async def test_retry_after_as_an_http_date_counts_from_now(make: Make, api: Api) -> None:
    handler = make(f"{api.base}/")
    when = formatdate(time.time() + 30, usegmt=True)
    with pytest.raises(RetryAfter) as caught:
        await handler(get(f"{api.base}/status/429?" + urlencode({"retry_after": when})), CALL)
    assert caught.value.seconds is not None
    assert 25 <= caught.value.seconds <= 31


# -- headers and bad payloads -------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"Host": "evil.test"}, "'Host' cannot be set"),
        ({"transfer-encoding": "chunked"}, "cannot be set"),
        ({"Content-Length": "5"}, "cannot be set"),
        ({"Connection": "close"}, "cannot be set"),
        ({"Proxy-Authorization": SECRET}, "cannot be set"),
        ({"X-Count": 5}, "'X-Count' must be a string, not int"),
        ({"X-Null": None}, "must be a string, not NoneType"),
        ({"X-List": [SECRET]}, "must be a string, not list"),
        ({"X-Evil": f"{SECRET}\r\nX-Injected: 1"}, "line break"),
        ({"X Bad": SECRET}, "not a valid HTTP token"),
        ({"Authorization": SECRET, "authorization": SECRET}, "given twice"),
    ],
)
def test_headers_a_job_cannot_send(headers: dict[str, Any], message: str) -> None:
    with pytest.raises(HttpPayloadError, match=message) as caught:
        parse_http_request(get("http://api.test/", headers=headers))
    assert isinstance(caught.value, PermanentError)
    assert isinstance(caught.value, ValueError)
    assert SECRET not in str(caught.value)


@pytest.mark.asyncio
async def test_a_refused_header_sends_nothing(make: Make, api: Api) -> None:
    with pytest.raises(HttpPayloadError, match="cannot be set"):
        await make(f"{api.base}/")(get(f"{api.base}/echo", headers={"Host": "x"}), CALL)
    assert api.seen == []


@pytest.mark.parametrize(
    "payload", ["GET http://x", {"url": "ftp://x"}, {"url": "http://x", "timeout": -1}]
)
def test_invalid_payloads_are_permanent(payload: Any) -> None:
    with pytest.raises(PermanentError):
        parse_http_request(payload)


# -- bounded memory -----------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["/big", "/endless"])
async def test_large_responses_stop_at_the_limit(make: Make, api: Api, path: str) -> None:
    handler = make(f"{api.base}/", max_bytes=1 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with pytest.raises(ResponseTooLarge, match=r"max_response_bytes \(1048576 bytes\)"):
        await handler(get(f"{api.base}{path}"), CALL)
    assert time.monotonic() - started < 20
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 * 1024, f"max RSS grew by {grown_kib} KiB"
    await async_wait_for(lambda: api.stopped, 20, what="the server to notice the hang-up")
    assert api.sent < 32 << 20  # the client hung up; it did not drain the body
    assert (await handler(get(f"{api.base}/echo"), CALL))["status"] == 200  # still usable


# -- secrets stay out of messages -------------------------------------------------


@pytest.mark.asyncio
async def test_error_messages_carry_no_query_or_header_values(make: Make, api: Api) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    handler = make(f"{api.base}/", f"http://127.0.0.1:{dead_port}/")
    query = f"?api_key={SECRET}&page=2"
    cases = [
        get(f"{api.base}/status/503{query}"),
        get(f"http://127.0.0.1:{dead_port}/x{query}"),
        get(f"http://10.0.0.1/x{query}"),
        get(f"{api.base}/slow{query}", timeout=0.2),
        get(f"{api.base}/big{query}"),
    ]
    for payload in cases:
        with pytest.raises((HttpCallError, PermanentError)) as caught:
            await handler({**payload, "headers": CREDENTIALS}, CALL)
        text = str(caught.value)
        assert SECRET not in text, text
        assert "api_key=[redacted]" in text, text


@pytest.mark.asyncio
async def test_http_specs_share_one_handler_and_sessions_close() -> None:
    table = load_handlers(("http", "b=http"), http=HttpPolicy(), limits=Limits())
    assert table["http"].fn is table["b"].fn
    assert table["b"].is_async
    assert isinstance(table["http"].fn, HttpHandler)
    await close_http_session()
