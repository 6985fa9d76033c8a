"""Network namespaces of the tests' own making, joined by veth pairs, for faults of a real
network: a link shaped with ``tbf`` (bandwidth and a short queue that drops), or cut with
``ip link set ... down`` behind fixed neighbour entries (a silent black hole that keeps the
TCP connections open). Addresses are 10.250.x.y inside the namespaces only: nothing is
added to the machine's own namespace and no traffic leaves the machine.

A process in a namespace is reached from outside through a Unix socket (paths cross
network namespaces): ``python -m scripts.kit.netns forward SOCKET PORT`` run inside the
namespace relays each connection to ``127.0.0.1:PORT`` there.

Needs root (CAP_NET_ADMIN) and iproute2; :func:`unavailable` says why not where it cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field


def ip(*args: str, ns: str | None = None) -> str:
    """Run ``ip ARGS`` (inside ``ns`` if given); its output. Raises CalledProcessError."""
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, argv, done.stdout, done.stderr)
    return done.stdout


def tc(ns: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "tc", *args], check=True, timeout=10)


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 not installed (Debian package iproute2)"
    name = f"chatprobe-{uuid.uuid4().hex[:6]}"
    try:
        ip("netns", "add", name)
    except (subprocess.CalledProcessError, OSError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        return f"cannot create a network namespace (needs CAP_NET_ADMIN): {detail.strip()}"
    with contextlib.suppress(subprocess.CalledProcessError):
        ip("netns", "del", name)
    return None


@dataclass
class Link:
    """A veth pair between two namespaces, with an address at each end."""

    left_ns: str
    left_dev: str
    left_addr: str
    right_ns: str
    right_dev: str
    right_addr: str

    def mac(self, ns: str, dev: str) -> str:
        out = ip("-o", "link", "show", dev, ns=ns)
        return out.split("link/ether", 1)[1].split()[0]

    def pin_neighbours(self) -> None:
        """Fixed neighbour entries both ways: a cut link then drops packets silently
        instead of failing address resolution (which TCP would hear of)."""
        right_mac = self.mac(self.right_ns, self.right_dev)
        left_mac = self.mac(self.left_ns, self.left_dev)
        ip("neigh", "replace", self.right_addr, "lladdr", right_mac, "dev", self.left_dev,
           "nud", "permanent", ns=self.left_ns)  # fmt: skip
        ip("neigh", "replace", self.left_addr, "lladdr", left_mac, "dev", self.right_dev,
           "nud", "permanent", ns=self.right_ns)  # fmt: skip

    def cut(self) -> None:
        """Partition: the right end down; packets either way vanish."""
        self.pin_neighbours()
        ip("link", "set", self.right_dev, "down", ns=self.right_ns)

    def heal(self) -> None:
        ip("link", "set", self.right_dev, "up", ns=self.right_ns)
        self.pin_neighbours()

    def shape(self, rate: str, burst: str = "4kb", latency: str = "20ms") -> None:
        """``tbf`` both ways: ``rate`` and a queue of ``latency``; what overflows is dropped."""
        for ns, dev in ((self.left_ns, self.left_dev), (self.right_ns, self.right_dev)):
            tc(ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
               "burst", burst, "latency", latency)  # fmt: skip

    def drops(self) -> int:
        """Packets the shaping dropped so far, both ends."""
        total = 0
        for ns, dev in ((self.left_ns, self.left_dev), (self.right_ns, self.right_dev)):
            out = subprocess.run(
                ["ip", "netns", "exec", ns, "tc", "-s", "qdisc", "show", "dev", dev],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout  # fmt: skip
            if "dropped" in out:
                total += int(out.split("dropped", 1)[1].split(",")[0].strip())
        return total


@dataclass
class Namespaces:
    """Namespaces made for one test; :meth:`close` deletes them (and their veths)."""

    prefix: str = field(default_factory=lambda: f"chat{os.getpid() % 10000}{uuid.uuid4().hex[:4]}")
    names: list[str] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)

    def add(self, short: str) -> str:
        name = f"{self.prefix}-{short}"
        ip("netns", "add", name)
        self.names.append(name)
        ip("link", "set", "lo", "up", ns=name)
        return name

    def link(self, left: str, right: str, subnet: int) -> Link:
        """A veth pair ``left`` (10.250.SUBNET.2) to ``right`` (10.250.SUBNET.1)."""
        tag = f"{len(self.links)}{uuid.uuid4().hex[:4]}"
        ldev, rdev = f"cl{tag}", f"cr{tag}"
        ip("link", "add", ldev, "netns", left, "type", "veth", "peer", "name", rdev,
           "netns", right)  # fmt: skip
        link = Link(left, ldev, f"10.250.{subnet}.2", right, rdev, f"10.250.{subnet}.1")
        for ns, dev, addr in ((left, ldev, link.left_addr), (right, rdev, link.right_addr)):
            ip("addr", "add", f"{addr}/24", "dev", dev, ns=ns)
            ip("link", "set", dev, "up", ns=ns)
        self.links.append(link)
        return link

    def close(self) -> None:
        for name in reversed(self.names):
            with contextlib.suppress(subprocess.CalledProcessError):
                ip("netns", "del", name)
        self.names.clear()


@contextlib.contextmanager
def namespaces() -> Iterator[Namespaces]:
    made = Namespaces()
    try:
        yield made
    finally:
        made.close()


def in_ns(ns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside ``ns`` (``ip netns exec`` execs it: the pid is the command's)."""
    return ["ip", "netns", "exec", ns, *argv]


def forward_argv(socket_path: str, port: int) -> list[str]:
    return [sys.executable, "-m", "scripts.kit.netns", "forward", socket_path, str(port)]


# The relay -----------------------------------------------------------------------------------


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _forward(socket_path: str, port: int) -> None:
    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_unix_server(relay, path=socket_path)
    async with server:
        await server.serve_forever()


def main(argv: Sequence[str]) -> int:
    if len(argv) != 3 or argv[0] != "forward":
        print("usage: python -m scripts.kit.netns forward SOCKET PORT", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_forward(argv[1], int(argv[2])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
