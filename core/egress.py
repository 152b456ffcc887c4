"""Where webhooks may go: only public addresses, unless the operator opens a range.

A ``callback_url`` is chosen by the caller, so without a policy the worker would
POST wherever it is told: to the metadata service (169.254.169.254), to an admin
port on localhost, across the private network. The policy:

* **At submit** (:func:`check_callback_url`): a host written as an IP literal
  must be a public address (or inside ``GENQ_WEBHOOK_ALLOW_NETWORKS``); odd
  spellings that C resolvers accept (``2130706433``, ``0x7f.1``, ``017700000001``,
  ``127.1``) are refused outright, whatever the allow-list, as no one writes a
  real receiver's address that way. Names are resolved only at send time: DNS
  answers change.
* **At send** (:class:`EgressTransport`): the name is resolved, *every* address it
  resolves to must pass the same check, and the connection is made to the
  address that was checked (the TLS server name and ``Host`` stay the name), so
  a DNS answer that changes between the check and the connect (rebinding)
  cannot redirect it.
* When ``HTTP_PROXY``/``HTTPS_PROXY`` apply (``NO_PROXY`` honoured), the POST goes
  through the proxy, which resolves the name itself; the name is still resolved
  and checked here first, and the proxy is expected to enforce its own policy.

Each attempt also has one total deadline (:func:`deadline`): the name's
resolution and every read and write on the connection are given only the time
left, so neither a slow resolver nor a receiver trickling a byte a second can
hold a send past it (a resolution that runs out fails as ``dns_timeout``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import ipaddress
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from core.errors import CoreError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class EgressRefusedError(httpcore.ConnectError):
    """The destination is not allowed. A ``httpcore.ConnectError`` so that httpx
    reports it as a connection failure with this message."""


def parse_networks(value: str | Iterable[str]) -> tuple[IPNetwork, ...]:
    """Comma-separated CIDRs (``127.0.0.0/8,10.1.0.0/16``) as networks; a bare
    address is a /32 (/128). Raises ValueError naming a bad entry."""
    items = value.split(",") if isinstance(value, str) else list(value)
    networks = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError as exc:
            raise ValueError(f"{item!r} is not a CIDR network ({exc})") from exc
    return tuple(networks)


def refusal(ip: IPAddress, allow: Iterable[IPNetwork] = ()) -> str | None:
    """Why ``ip`` may not be sent to, or None if it may (public, or allowed)."""
    if any(ip.version == net.version and ip in net for net in allow):
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        # Addresses that embed an IPv4 one reach it: judge them as refused outright
        # rather than by the embedded address, no receiver needs them.
        if ip.ipv4_mapped is not None:
            return "an IPv4-mapped IPv6 address"
        if ip.sixtofour is not None or ip.teredo is not None:
            return "a 6to4/Teredo address"
    for kind in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    if not ip.is_global:  # CGNAT 100.64/10, documentation and benchmarking ranges, ...
        return "not a public address"
    return None


def odd_ipv4_spelling(host: str) -> bool:
    """Whether ``host`` is an IPv4 address written in a form that resolvers
    (``inet_aton``) accept but ``ipaddress`` does not: decimal, octal, hex, short."""
    try:
        ipaddress.IPv4Address(host)
        return False
    except ValueError:
        pass
    last = host.rstrip(".").rsplit(".", 1)[-1]
    if not last or not (last.isdigit() or last.lower().startswith("0x")):
        return False  # a name: its last label is not a number
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


def literal_ip(host: str) -> IPAddress | None:
    """The address when ``host`` is an IP literal (``[::1]`` or ``::1``), else None."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def check_callback_url(url: str, allow: Iterable[IPNetwork] = ()) -> str | None:
    """Why a ``callback_url`` is refused at submit, or None. Only literal addresses
    and odd spellings are judged here; names are judged when resolved at send."""
    host = urlsplit(url).hostname or ""
    if not host:
        return "the URL has no host"
    try:
        host.encode("idna")
    except UnicodeError:
        return f"the host {host!r} is not a valid host name"
    if odd_ipv4_spelling(host):
        return f"the host {host!r} is an IPv4 address in an unusual spelling; write it dotted"
    ip = literal_ip(host)
    if host == "localhost" or host.endswith(".localhost"):  # loopback by RFC 6761
        ip = ipaddress.IPv4Address("127.0.0.1")
    if ip is not None and (reason := refusal(ip, allow)) is not None:
        return f"webhooks may not be sent to {ip} ({reason}); see GENQ_WEBHOOK_ALLOW_NETWORKS"
    return None


class CallbackRefusedError(CoreError, ValueError):
    """A ``callback_url`` the policy refuses at submit; ``param`` names the field
    (HTTP 422 ``callback_url_refused``)."""

    code = "callback_url_refused"

    def __init__(self, reason: str, param: str) -> None:
        super().__init__(f"{param}: {reason}", param=param)
        self.reason = reason


def check_callbacks(
    urls: Iterable[tuple[str, str | None]], allow: Iterable[IPNetwork] = ()
) -> None:
    """Raise :class:`CallbackRefusedError` for the first ``(param, url)`` refused."""
    allowed = tuple(allow)
    for param, url in urls:
        if url is not None and (reason := check_callback_url(url, allowed)) is not None:
            raise CallbackRefusedError(reason, param)


# --- one deadline per attempt --------------------------------------------------------------

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "genq_egress_deadline", default=None
)


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Within this block (this thread), resolving a name and every socket operation
    on a connection made by an :class:`EgressTransport` get only the time left until
    ``seconds`` from now."""
    token = _deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


def _time_left(timeout: float | None) -> float | None:
    end = _deadline.get()
    if end is None:
        return timeout
    left = end - time.monotonic()
    if left <= 0:
        raise httpcore.ReadTimeout("the attempt's deadline passed")
    return left if timeout is None else min(timeout, left)


class DNSTimeoutError(httpcore.ConnectTimeout):
    """The name was not resolved within the attempt's deadline (httpx reports it
    as a ``ConnectTimeout`` with this message)."""

    def __init__(self, host: str) -> None:
        super().__init__(f"dns_timeout: {host!r} was not resolved within the attempt's deadline")


# getaddrinfo cannot be interrupted: a lookup bounded by a deadline runs on one of
# these threads and is abandoned (left to finish) when the deadline comes first.
# Bounded, so a resolver that never answers ties up at most this many threads.
RESOLVER_THREADS = 16
# Of those, at most this many per domain (the name's last two labels): an
# abandoned lookup holds its thread until the system resolver gives up (often
# 10-30 s, longer than the attempt), so without this one owner's callbacks to
# names under one slow domain would fill the pool and every other owner's lookup
# would queue behind them and fail as dns_timeout.
RESOLVER_THREADS_PER_DOMAIN = 4
_resolver = concurrent.futures.ThreadPoolExecutor(
    max_workers=RESOLVER_THREADS, thread_name_prefix="genq-dns"
)
_resolving: collections.Counter[str] = collections.Counter()  # domain: lookups not finished
_resolving_lock = threading.Lock()


def _domain(host: str) -> str:
    """What the per-domain cap counts: the last two labels (``b.evil.example`` and
    ``c.evil.example`` share ``evil.example``; under a two-label public suffix such
    as ``co.uk`` all its names share one cap, which only matters while their
    lookups are slow)."""
    return ".".join(host.lower().rstrip(".").split(".")[-2:])


def _lookup(domain: str, host: str, port: int) -> list[Any]:
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    finally:
        _release(domain)


def _release(domain: str) -> None:
    with _resolving_lock:
        _resolving[domain] -= 1
        if _resolving[domain] <= 0:
            del _resolving[domain]


def _getaddrinfo(host: str, port: int, timeout: float | None) -> list[Any]:
    if timeout is None:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    domain = _domain(host)
    with _resolving_lock:
        if _resolving[domain] >= RESOLVER_THREADS_PER_DOMAIN:
            raise DNSTimeoutError(host)  # its earlier lookups are still stuck
        _resolving[domain] += 1
    lookup = _resolver.submit(_lookup, domain, host, port)
    try:
        return lookup.result(timeout)
    except concurrent.futures.TimeoutError:
        if lookup.cancel():  # it had not started: it never will
            _release(domain)
        raise DNSTimeoutError(host) from None


def resolve(
    host: str, port: int, allow: Iterable[IPNetwork] = (), *, timeout: float | None = None
) -> list[str]:
    """The addresses of ``host``, each checked; raises :class:`EgressRefusedError`
    if any is refused (a name that also resolves to an internal address is not
    trusted with the public one either). The lookup is given at most ``timeout``
    and what is left of the attempt's :func:`deadline`, else
    :class:`DNSTimeoutError`."""
    allowed = tuple(allow)
    try:
        infos = _getaddrinfo(host, port, _time_left(timeout))
    except OSError as exc:
        raise httpcore.ConnectError(f"cannot resolve {host!r}: {exc.strerror or exc}") from exc
    except (UnicodeError, ValueError) as exc:  # not a name the resolver can take
        raise httpcore.ConnectError(f"cannot resolve {host!r}: {exc}") from exc
    addresses: list[str] = []
    for info in infos:
        address = str(info[4][0]).split("%", 1)[0]  # drop an IPv6 zone
        ip = ipaddress.ip_address(address)
        if (reason := refusal(ip, allowed)) is not None:
            raise EgressRefusedError(
                f"refused by the egress policy: {host} resolves to {ip} ({reason})"
            )
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise httpcore.ConnectError(f"cannot resolve {host!r}: no address")
    return addresses


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write is bounded by the attempt's deadline."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _time_left(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _time_left(timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        tls = self._inner.start_tls(ssl_context, server_hostname, _time_left(timeout))
        return _DeadlineStream(tls)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    """Connects to checked addresses only (``check``), with deadline-bound streams."""

    def __init__(self, allow: tuple[IPNetwork, ...], *, check: bool) -> None:
        self._allow = allow
        self._check = check
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        targets = resolve(host, port, self._allow, timeout=timeout) if self._check else [host]
        error: Exception | None = None
        for address in targets:  # the checked addresses, never the name again
            try:
                stream = self._inner.connect_tcp(
                    address, port, _time_left(timeout), local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
                continue
            return _DeadlineStream(stream)
        assert error is not None
        raise error

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        raise EgressRefusedError("unix sockets are not webhook destinations")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@dataclasses.dataclass(frozen=True)
class _Proxy:
    url: str
    transport: httpx.HTTPTransport


class EgressTransport(httpx.BaseTransport):
    """An httpx transport that sends only where the policy allows (see the module
    docstring); proxies from the environment are used as httpx would use them."""

    def __init__(
        self,
        allow: Iterable[IPNetwork] = (),
        *,
        proxies: dict[str, str] | None = None,
        max_connections: int = 64,
    ) -> None:
        self._allow = tuple(allow)
        self._direct = httpx.HTTPTransport()
        self._direct._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=max_connections,
            network_backend=_Backend(self._allow, check=True),
        )
        env = urllib.request.getproxies() if proxies is None else proxies
        self._proxies = {
            scheme: _Proxy(url, self._proxy_transport(url, max_connections))
            for scheme, url in env.items()
            if scheme in ("http", "https") and url
        }

    @staticmethod
    def _proxy_transport(url: str, max_connections: int) -> httpx.HTTPTransport:
        transport = httpx.HTTPTransport(proxy=url)
        if isinstance(transport._pool, httpcore.HTTPProxy):
            proxy = httpx.URL(url)
            transport._pool = httpcore.HTTPProxy(
                proxy_url=httpcore.URL(
                    scheme=proxy.raw_scheme, host=proxy.raw_host, port=proxy.port, target="/"
                ),
                proxy_auth=(proxy.username, proxy.password) if proxy.username else None,
                ssl_context=httpx.create_ssl_context(),
                max_connections=max_connections,
                network_backend=_Backend((), check=False),
            )
        return transport

    def _proxy_for(self, url: httpx.URL) -> _Proxy | None:
        proxy = self._proxies.get(url.scheme)
        if proxy is None or urllib.request.proxy_bypass(url.host):
            return None
        return proxy

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        proxy = self._proxy_for(request.url)
        if proxy is None:
            return self._direct.handle_request(request)
        # Through a proxy the name is resolved there; check it here too.
        host, port = (
            request.url.host,
            request.url.port or (443 if request.url.scheme == "https" else 80),
        )
        try:
            resolve(host, port, self._allow)
        except EgressRefusedError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except (DNSTimeoutError, httpcore.ReadTimeout) as exc:  # the deadline passed
            raise httpx.ConnectTimeout(str(exc), request=request) from exc
        except httpcore.ConnectError:
            pass  # a name only the proxy can resolve: its policy applies
        return proxy.transport.handle_request(request)

    def close(self) -> None:
        self._direct.close()
        for proxy in self._proxies.values():
            proxy.transport.close()
