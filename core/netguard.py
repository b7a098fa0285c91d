"""SSRF guard for connector targets.

Targets must be https on the connector's own hosts, and every address a host resolves to
must be public: loopback, private, link-local (cloud metadata), CGNAT, multicast and reserved
ranges are refused. IPAAS_ALLOW_INSECURE_TARGETS=1 lifts both rules for tests and local
development (the core warns at start-up). The transport checks the resolved addresses just
before each request; a DNS answer that changes between the check and the connect (rebinding)
is a known residual risk, narrowed by the short window.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Iterable
from urllib.parse import urlsplit

import httpx

from ipaas.sdk import PermanentError

_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


def forbidden_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
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


class GuardedTransport(httpx.AsyncBaseTransport):
    """Resolves the host and refuses non-public addresses before handing the request on."""

    def __init__(self, inner: httpx.AsyncBaseTransport, allow_insecure: bool) -> None:
        self.inner = inner
        self.allow_insecure = allow_insecure

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not self.allow_insecure:
            if request.url.scheme != "https":
                raise PermanentError("the target must use https")
            host = request.url.host
            port = request.url.port or 443
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except socket.gaierror:
                raise httpx.ConnectError(f"cannot resolve {host}", request=request) from None
            if any(forbidden_address(info[4][0]) for info in infos):
                raise PermanentError(f"the target {host} resolves to a non-public address")
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()
