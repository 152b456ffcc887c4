"""Hosts on one machine: network namespaces joined to the root namespace by veth pairs.

Each "host" is a network namespace with one veth link to the root namespace. The
services the hosts use (PostgreSQL, Redis, a webhook receiver) live in the root
namespace behind one *hub* address, which sits on a veth pair of its own (both
ends in the root namespace) so no interface of the machine is touched. PostgreSQL
and Redis listen on 127.0.0.1 only, so a :class:`Forwarder` on the hub address
carries each connection to them.

Cutting a host (:meth:`Network.cut`) sets the root end of its link down: the
host's end loses carrier but keeps its routes, so its packets are silently
dropped, as when a switch dies, rather than refused. Nothing leaves the machine:
the namespaces have a route to the hub only, and the root namespace holds a
blackhole route for the whole range, so replies to a cut host are dropped
instead of following the default route out of the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import secrets
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

from core import db

# Candidate ranges, tried in order; the first that overlaps no address or route of
# the machine is used. Each is split into /30 links, one per host.
CANDIDATE_RANGES = ("10.254.213.0/24", "10.254.214.0/24", "172.31.213.0/24")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; raises with its stderr when ``check`` and it fails."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (not root, no ``ip``, no netns), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs the integration tests as root)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"genq-probe-{secrets.token_hex(3)}"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


def free_range() -> ipaddress.IPv4Network:
    """A candidate range that overlaps nothing on this machine."""
    used = []
    for line in ip("-4", "-o", "addr", "show").stdout.splitlines():
        used.append(ipaddress.ip_interface(line.split()[3]).network)
    for line in ip("-4", "route", "show", "table", "all").stdout.splitlines():
        target = line.split()[0]
        if target in ("default", "broadcast", "local", "unreachable", "blackhole"):
            target = line.split()[1] if target != "default" else "0.0.0.0/0"
        with contextlib.suppress(ValueError):
            network = ipaddress.ip_network(target, strict=False)
            if network.prefixlen > 0:
                used.append(network)
    for candidate in map(ipaddress.IPv4Network, CANDIDATE_RANGES):
        if not any(candidate.overlaps(network) for network in used):
            return candidate
    raise RuntimeError(f"every candidate range is in use: {CANDIDATE_RANGES}")


class Network:
    """``hosts`` namespaces, each linked to the root namespace, and a hub address.

    Use as a context manager: everything made is removed on exit, in reverse order,
    even when setting up failed half-way.
    """

    def __init__(self, hosts: int) -> None:
        self.tag = secrets.token_hex(3)
        self.range = free_range()
        subnets = list(self.range.subnets(new_prefix=30))
        hub_net, links = subnets[0], subnets[1 : hosts + 1]
        self.hub = str(hub_net[1])
        self.names = [f"genq-{self.tag}-{i}" for i in range(hosts)]
        self.root_ifs = [f"gq{self.tag}r{i}" for i in range(hosts)]
        self.host_ifs = [f"gq{self.tag}h{i}" for i in range(hosts)]
        self.root_addrs = [str(net[1]) for net in links]
        self.host_addrs = [str(net[2]) for net in links]
        self._hub_if = f"gq{self.tag}hub"
        self._undo: list[tuple[str, ...]] = []

    def __enter__(self) -> Network:
        try:
            self._build()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        while self._undo:
            ip(*self._undo.pop(), check=False)

    def _build(self) -> None:
        ip("route", "add", "blackhole", str(self.range))
        self._undo.append(("route", "del", "blackhole", str(self.range)))
        ip("link", "add", self._hub_if, "type", "veth", "peer", "name", f"{self._hub_if}p")
        self._undo.append(("link", "del", self._hub_if))
        ip("addr", "add", f"{self.hub}/32", "dev", self._hub_if)
        ip("link", "set", f"{self._hub_if}p", "up")
        ip("link", "set", self._hub_if, "up")
        for name, root_if, host_if, root_addr, host_addr in zip(
            self.names, self.root_ifs, self.host_ifs, self.root_addrs, self.host_addrs, strict=True
        ):
            ip("netns", "add", name)
            self._undo.append(("netns", "del", name))  # takes the host's end of the link
            ip("link", "add", root_if, "type", "veth", "peer", "name", host_if)
            self._undo.append(("link", "del", root_if))
            ip("link", "set", host_if, "netns", name)
            ip("addr", "add", f"{root_addr}/30", "dev", root_if)
            ip("link", "set", root_if, "up")
            ip("-n", name, "link", "set", "lo", "up")
            ip("-n", name, "addr", "add", f"{host_addr}/30", "dev", host_if)
            ip("-n", name, "link", "set", host_if, "up")
            # The hub only: a host has no route anywhere else.
            ip("-n", name, "route", "add", f"{self.hub}/32", "via", root_addr)

    def command(self, host: int, argv: list[str]) -> list[str]:
        """``argv`` run inside host ``host``'s namespace."""
        return ["ip", "netns", "exec", self.names[host], *argv]

    def cut(self, host: int) -> None:
        """Partition a host: its link goes dark (packets dropped, no error)."""
        ip("link", "set", self.root_ifs[host], "down")

    def heal(self, host: int) -> None:
        """Reconnect a cut host; its TCP connections resume where they stalled."""
        ip("link", "set", self.root_ifs[host], "up")

    def contains(self, address: str) -> bool:
        """Whether ``address`` is one of this network's (a host or the hub)."""
        return ipaddress.ip_address(address) in self.range


class Forwarder:
    """A TCP forwarder on ``listen_host`` (a free port) to ``target``, in its own
    thread: how hosts reach services that listen on 127.0.0.1 only. Connections
    from outside ``allowed`` are closed at once, so the forwarder exposes nothing
    beyond this machine's namespaces. With ``probe_hosts`` it finds a cut host out as
    the service would on its own link (:func:`probe_silent_peer`)."""

    def __init__(
        self,
        listen_host: str,
        target: tuple[str, int],
        allowed: Network,
        *,
        probe_hosts: bool = False,
    ) -> None:
        self.listen_host = listen_host
        self.probe_hosts = probe_hosts
        self.target = target
        self.allowed = allowed
        self.port = 0
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="genq-forwarder", daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def __enter__(self) -> Forwarder:
        self._thread.start()
        if not self._ready.wait(10) or self._server is None:
            raise RuntimeError(f"forwarder on {self.listen_host} did not start")
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.create_task, self._shutdown())
        self._thread.join(timeout=10)

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._accept, self.listen_host, 0)
            )
            self.port = self._server.sockets[0].getsockname()[1]
        finally:
            self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._loop.stop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            peer = writer.get_extra_info("peername")[0]
            if not self.allowed.contains(peer):
                return
            self.connections += 1
            if self.probe_hosts:
                probe_silent_peer(writer.get_extra_info("socket"))
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                up_writer.close()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)


def probe_silent_peer(sock: Any) -> None:
    """Probe a host's connection as genq asks PostgreSQL to probe its own
    (:func:`core.db.session_limits`). The forwarder stands between the server and the
    hosts: the server's probes reach the forwarder, which always answers, so it is the
    forwarder that must find a cut host out. When it does, the read fails, the pipe
    closes the server's side, and the server ends the session (rolling back what the
    cut host left half-sent) as it would on its own link."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, db.TCP_KEEPALIVE_IDLE_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, db.TCP_KEEPALIVE_INTERVAL_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, db.TCP_KEEPALIVE_COUNT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, db.TCP_USER_TIMEOUT_S * 1000)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until end of stream, then pass the end on (half-close)."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()


@contextlib.contextmanager
def network(hosts: int) -> Iterator[Network]:
    """A :class:`Network` for the block's duration."""
    with Network(hosts) as net:
        yield net
