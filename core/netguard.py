"""SSRF guard for connector targets.

Targets must be https on the connector's own hosts, and every address a host resolves to
must be public: loopback, private, link-local (cloud metadata), CGNAT, multicast and reserved
ranges are refused. IPAAS_ALLOW_INSECURE_TARGETS=1 lifts both rules for tests and local
development (the core warns at start-up).

With the default transport (aiohttp underneath httpx) the check sits in the connection pool's
DNS resolver: the addresses checked are the addresses connected to, so a DNS answer that
changes between a check and the connect (rebinding) has no window, and a kept-alive
connection costs no lookup. IP literals never reach a resolver, so the transport checks them.
With IPAAS_HTTP_TRANSPORT=httpx the transport resolves and checks before each request, and
httpcore resolves again to connect: rebinding there is a residual risk of that option.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Callable, Iterable
from urllib.parse import urlsplit

import httpx
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from ipaas.sdk import PermanentError

_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


def forbidden_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv4 address inside an IPv6 one reaches that IPv4 host: mapped (::ffff:a.b.c.d),
        # or 6to4 (2002:AABB:CCDD::/48), which a host with a 6to4 route relays to it.
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            ip = embedded
    return (
        ip in _METADATA
        or ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or (isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT)
    )


def check_url(url: str, allowed_hosts: Iterable[str], allow_insecure: bool) -> None:
    """Refuse a target URL that breaks the rules (before any DNS lookup)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise PermanentError("the target is not a valid URL") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise PermanentError("the target must be an http(s) URL")
    if allow_insecure:
        return
    if parts.scheme != "https":
        raise PermanentError("the target must use https")
    allowed = tuple(allowed_hosts)
    if allowed and parts.hostname.lower().rstrip(".") not in allowed:
        raise PermanentError(f"the target host {parts.hostname} is not one of {', '.join(allowed)}")
    try:
        literal = ipaddress.ip_address(parts.hostname)
    except ValueError:
        return
    if forbidden_address(str(literal)):
        raise PermanentError("the target address is not public")


def _literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


class GuardedResolver(AbstractResolver):
    """The connection pool's resolver: answers only with public addresses, else refuses."""

    def __init__(self, inner: AbstractResolver | None = None, forbidden: Callable[[str], bool] = forbidden_address) -> None:
        self.inner = inner if inner is not None else DefaultResolver()
        self.forbidden = forbidden

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        answers = await self.inner.resolve(host, port, family)
        if any(self.forbidden(answer["host"]) for answer in answers):
            raise PermanentError(f"the target {host} resolves to a non-public address")
        return answers

    async def close(self) -> None:
        await self.inner.close()


class GuardedTransport(httpx.AsyncBaseTransport):
    """Refuses plain http and non-public targets before handing the request on.

    `resolver_guarded`: the inner transport connects only through a GuardedResolver, so only
    IP literals (which skip resolvers) are checked here."""

    def __init__(self, inner: httpx.AsyncBaseTransport, allow_insecure: bool, resolver_guarded: bool = False, allowed_hosts: Iterable[str] = ()) -> None:
        self.inner = inner
        self.allow_insecure = allow_insecure
        self.resolver_guarded = resolver_guarded
        self.allowed_hosts = frozenset(h.lower() for h in allowed_hosts)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not self.allow_insecure:
            if request.url.scheme != "https":
                raise PermanentError("the target must use https")
            host = request.url.host
            # On every request, not only when a credential is saved: a URL can also come
            # from a step's config (a template over the payload) or a credential field not
            # named *url, and the connector declared where it may go.
            if self.allowed_hosts and host.lower().rstrip(".") not in self.allowed_hosts:
                raise PermanentError(f"the target host {host} is not one of {', '.join(sorted(self.allowed_hosts))}")
            if _literal(host):
                if forbidden_address(host):
                    raise PermanentError(f"the target {host} is not a public address")
            elif not self.resolver_guarded:
                await self._check_resolved(request, host, request.url.port or 443)
        return await self.inner.handle_async_request(request)

    async def _check_resolved(self, request: httpx.Request, host: str, port: int) -> None:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror:
            raise httpx.ConnectError(f"cannot resolve {host}", request=request) from None
        if any(forbidden_address(info[4][0]) for info in infos):
            raise PermanentError(f"the target {host} resolves to a non-public address")

    async def aclose(self) -> None:
        await self.inner.aclose()
