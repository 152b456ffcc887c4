"""The webhook egress policy (core/egress.py): which addresses are refused, odd
spellings, the 422 at submit, and a transport that connects only to checked
addresses, through a proxy when one is set, within one deadline per attempt."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpcore
import httpx
import pytest
from fastapi.testclient import TestClient

from core import egress, webhooks

LOOPBACK = egress.parse_networks("127.0.0.0/8")


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "127.9.9.9", "::1", "10.0.0.1", "172.16.5.4", "192.168.1.1",
        "169.254.169.254", "100.64.0.1", "224.0.0.1", "239.1.2.3", "0.0.0.0", "::",
        "::ffff:127.0.0.1", "::ffff:8.8.8.8", "fe80::1", "fc00::1", "ff02::1",
        "2002:7f00:1::", "192.0.2.1", "198.18.0.1", "255.255.255.255",
    ],
)  # fmt: skip
def test_internal_addresses_are_refused(address: str) -> None:
    assert egress.refusal(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert egress.refusal(ipaddress.ip_address(address)) is None


def test_the_allow_list_opens_only_its_ranges() -> None:
    allow = egress.parse_networks("127.0.0.0/8, 10.1.0.0/16")
    assert egress.refusal(ipaddress.ip_address("127.0.0.1"), allow) is None
    assert egress.refusal(ipaddress.ip_address("10.1.2.3"), allow) is None
    assert egress.refusal(ipaddress.ip_address("10.2.0.1"), allow) is not None
    assert egress.refusal(ipaddress.ip_address("::1"), allow) is not None
    with pytest.raises(ValueError, match="nope"):
        egress.parse_networks("127.0.0.0/8,nope")


@pytest.mark.parametrize(
    "url",
    [
        "http://2130706433/x", "http://0x7f.1/", "http://017700000001/", "http://127.1/",
        "http://0x7f000001/", "http://127.0.0.1:8080/", "http://[::1]/", "http://localhost/",
        "http://a.localhost/", "http://169.254.169.254/latest/meta-data",
        "http://[::ffff:127.0.0.1]/",
    ],
)  # fmt: skip
def test_refused_literals_and_odd_spellings_at_submit(url: str) -> None:
    assert egress.check_callback_url(url) is not None


def test_odd_spellings_stay_refused_even_when_their_range_is_allowed() -> None:
    assert egress.check_callback_url("http://127.0.0.1/", LOOPBACK) is None
    assert egress.check_callback_url("http://2130706433/", LOOPBACK) is not None
    assert egress.check_callback_url("https://hooks.example.com/x") is None
    assert egress.check_callback_url("http://8.8.8.8/x") is None
    assert not egress.odd_ipv4_spelling("hooks.example.com")
    assert not egress.odd_ipv4_spelling("1.2.3.4")


@pytest.mark.parametrize(
    "spelling",
    ["127.0.0.1", "2130706433", "0x7f.1", "017700000001", "127.1", "[::1]", "localhost",
     "169.254.169.254", "[::ffff:127.0.0.1]"],
)  # fmt: skip
def test_the_api_answers_422_naming_callback_url(client: TestClient, spelling: str) -> None:
    url = f"http://{spelling}:8080/hook"
    response = client.post("/v1/jobs", json={"prompt": "hi", "callback_url": url})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "callback_url"
    bulk = client.post(
        "/v1/jobs/bulk", json={"jobs": [{"prompt": "a"}, {"prompt": "b", "callback_url": url}]}
    )
    assert bulk.status_code == 422 and bulk.json()["error"]["param"] == "jobs.1.callback_url"
    batch = client.post("/v1/batches", json={"input_file_id": "file_x", "callback_url": url})
    assert batch.status_code == 422 and batch.json()["error"]["param"] == "callback_url"


# --- the transport, against real local servers -------------------------------------------


class Server:
    """A local HTTP server; ``handler`` gets each request (BaseHTTPRequestHandler)."""

    def __init__(self, handle: Any) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append((self.path, dict(self.headers)))
                handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def answer(code: int, body: bytes = b"") -> Any:
    def handle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(code)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return handle


@pytest.fixture
def ok_server() -> Iterator[Server]:
    server = Server(answer(200))
    yield server
    server.close()


def post(transport: httpx.BaseTransport, url: str) -> httpx.Response:
    with httpx.Client(transport=transport, timeout=5) as client:
        return client.post(url, content=b"{}")


def test_loopback_is_refused_by_name_and_literal_unless_allowed(ok_server: Server) -> None:
    for host in ("127.0.0.1", "localhost"):
        url = f"http://{host}:{ok_server.port}/hook"
        with pytest.raises(httpx.ConnectError, match="refused by the egress policy"):
            post(egress.EgressTransport(proxies={}), url)
        assert post(egress.EgressTransport(LOOPBACK, proxies={}), url).status_code == 200
    assert len(ok_server.requests) == 2  # only the allowed ones arrived


def fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[list[str]]]) -> list[str]:
    """Make ``socket.getaddrinfo`` answer for the given names, one answer per call
    (the last repeats); returns the names asked, in order."""
    real = socket.getaddrinfo
    asked: list[str] = []

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in answers:
            return real(host, port, *args, **kwargs)
        asked.append(host)
        addresses = answers[host][0] if len(answers[host]) == 1 else answers[host].pop(0)
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in addresses
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


def test_the_connection_goes_to_the_checked_address_with_the_name_as_host(
    ok_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rebinding name: first an allowed address, then (were it asked again) a
    # refused one. It is resolved once, and that address is the one connected to.
    asked = fake_dns(monkeypatch, {"rebind.test": [["127.0.0.1"], ["169.254.169.254"]]})
    response = post(
        egress.EgressTransport(LOOPBACK, proxies={}), f"http://rebind.test:{ok_server.port}/x"
    )
    assert response.status_code == 200
    assert asked == ["rebind.test"]
    ((_path, headers),) = ok_server.requests
    assert headers["Host"] == f"rebind.test:{ok_server.port}"


def test_a_name_with_any_refused_address_is_refused(
    ok_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_dns(monkeypatch, {"mixed.test": [["8.8.8.8", "10.0.0.7"]]})
    with pytest.raises(httpx.ConnectError, match=r"mixed.test resolves to 10.0.0.7 \(a private"):
        post(egress.EgressTransport(proxies={}), f"http://mixed.test:{ok_server.port}/x")


def test_a_proxy_from_the_environment_is_used_and_the_target_still_checked(
    ok_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{ok_server.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    transport = egress.EgressTransport()  # proxies read from the environment
    assert post(transport, "http://8.8.8.8:9/hook").status_code == 200
    ((path, _headers),) = ok_server.requests  # the proxy got the absolute URL
    assert path == "http://8.8.8.8:9/hook"
    with pytest.raises(httpx.ConnectError, match="refused by the egress policy"):
        post(transport, "http://10.0.0.1/hook")
    assert len(ok_server.requests) == 1
    # A name only the proxy can resolve is left to the proxy.
    assert post(transport, "http://hooks.invalid/hook").status_code == 200
    assert ok_server.requests[-1][0] == "http://hooks.invalid/hook"


def test_a_trickling_receiver_cannot_hold_an_attempt_past_its_deadline() -> None:
    stop = threading.Event()

    def trickle(h: BaseHTTPRequestHandler) -> None:
        # A valid answer, one byte at a time: each read finds a byte well within
        # any per-read timeout; only a total deadline ends it.
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + b"X: y\r\n" * 1000:
            if stop.is_set():
                return
            h.wfile.write(bytes([byte]))
            h.wfile.flush()
            time.sleep(0.05)

    server = Server(trickle)
    try:
        transport = egress.EgressTransport(LOOPBACK, proxies={})
        with (
            httpx.Client(transport=transport) as client,
            pytest.raises(httpx.TimeoutException),
            egress.deadline(0.5),
        ):
            client.post(f"http://127.0.0.1:{server.port}/", content=b"{}", timeout=5)
    finally:
        stop.set()
        server.close()


@pytest.mark.parametrize("url", ["http://a..b/", f"http://{'x' * 64}.example/"])
def test_a_host_no_resolver_can_take_is_refused_at_submit_and_at_send(url: str) -> None:
    """Such a name passes URL parsing but makes the IDNA codec raise; it must be a
    clear refusal, never an exception that leaves the delivery unrecorded."""
    assert "not a valid host name" in (egress.check_callback_url(url) or "")
    host = url.split("/")[2]
    with pytest.raises(httpcore.ConnectError, match="cannot resolve"):
        egress.resolve(host, 80)


@pytest.mark.parametrize("proxies", [{}, {"http": "http://127.0.0.1:9"}], ids=["direct", "proxy"])
def test_a_slow_resolver_fails_the_attempt_as_dns_timeout(
    monkeypatch: pytest.MonkeyPatch, proxies: dict[str, str]
) -> None:
    """A resolver that takes longer than the attempt's deadline ends the attempt at
    the deadline with genq's reason, directly and before a proxy alike."""
    answered = threading.Event()
    real = socket.getaddrinfo

    def slow(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "slow.test":
            answered.wait(3)  # well past the deadline below
            host = "127.0.0.1"
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    claimed = webhooks.Claimed("whd_slow", 1, dt.datetime.now(dt.UTC))
    prepared = webhooks.Prepared(claimed, "http://slow.test:9/hook", "job.completed", b"{}", [])
    transport = egress.EgressTransport(LOOPBACK, proxies=proxies)
    try:
        with httpx.Client(transport=transport) as client:
            attempt = webhooks.post(client, prepared, timeout_s=0.3)
    finally:
        answered.set()
    assert attempt.status_code is None
    assert attempt.error is not None and "dns_timeout" in attempt.error, attempt.error


def test_one_slow_domain_cannot_take_every_resolver_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lookups abandoned at their deadline keep their threads until the resolver
    answers: names under one slow domain (one owner's callbacks) may hold only a
    few, so another owner's name still resolves."""
    answered = threading.Event()
    real = socket.getaddrinfo

    def slow(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if str(host).endswith(".slow.test"):
            answered.wait(30)  # a resolver that does not answer
        return real("127.0.0.1", port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    try:
        for i in range(egress.RESOLVER_THREADS + 4):  # more names than threads
            with pytest.raises(egress.DNSTimeoutError):
                egress.resolve(f"h{i}.slow.test", 80, LOOPBACK, timeout=0.05)
        assert egress.resolve("other.test", 80, LOOPBACK, timeout=10) == ["127.0.0.1"]
    finally:
        answered.set()
