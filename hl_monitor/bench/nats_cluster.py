"""A local NATS cluster: three `nats-server` processes from the wheel, routed together, JetStream on each.

Used by the replica benchmark (`hl_monitor/bench/replicas.py`) and the cluster tests
(`tests/support/nats_cluster.py`). Every node listens on loopback only, has its own store directory and
`server_name`, and routes to the others; `start()` returns once the cluster has a JetStream meta leader, so a
replicated stream can be created at once. Nodes are killed (`kill -9`), stopped (SIGTERM, which lets the node
hand its leaderships over) and restarted on the same ports and store.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp

from hl_monitor.delivery.embedded_nats import find_nats_server

HOST: Final = "127.0.0.1"
CLUSTER_NAME: Final = "hlm-test"
NODES: Final = 3  # the smallest cluster that keeps a quorum with one node down
# A node's client port answers within a second on an idle machine; a busy 2-core box with JetStream recovery
# (the store replayed after kill -9) takes several.
NODE_START_S: Final = 20.0
# Electing a meta leader takes a few raft election timeouts (seconds); after a kill -9 of the leader, longer.
LEADER_WAIT_S: Final = 30.0
POLL_S: Final = 0.05  # short against an election, long enough not to spin
STOP_GRACE_S: Final = 10.0  # SIGTERM lets a node transfer its leaderships first; this bounds that
HTTP_TIMEOUT_S: Final = 1.0  # one monitoring request on loopback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class ClusterNode:
    """One `nats-server` of the cluster."""

    name: str
    store: Path
    port: int = field(default_factory=_free_port)
    cluster_port: int = field(default_factory=_free_port)
    http_port: int = field(default_factory=_free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class NatsCluster:
    """`NODES` routed `nats-server` processes with JetStream under `root` (one store and config file each)."""

    def __init__(self, root: Path, size: int = NODES, binary: str | None = None) -> None:
        self.root = root
        self._binary = binary
        self.nodes = [ClusterNode(f"n{i + 1}", root / f"n{i + 1}" / "store") for i in range(size)]

    @property
    def seeds(self) -> str:
        """The seed list for `nats.url`: every node, comma-separated."""
        return ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> ClusterNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def node_of_url(self, url: str) -> ClusterNode:
        """The node listening at `url` (as a client reports its connected server)."""
        for node in self.nodes:
            if url.rstrip("/").endswith(f":{node.port}"):
                return node
        raise KeyError(url)

    def _config(self, node: ClusterNode) -> Path:
        routes = ", ".join(f'"nats-route://{HOST}:{n.cluster_port}"' for n in self.nodes if n is not node)
        text = (
            f'server_name: "{node.name}"\n'
            f'listen: "{HOST}:{node.port}"\n'
            f'http: "{HOST}:{node.http_port}"\n'
            f'jetstream {{ store_dir: "{node.store}" }}\n'
            f"cluster {{\n"
            f'  name: "{CLUSTER_NAME}"\n'
            f'  listen: "{HOST}:{node.cluster_port}"\n'
            f"  routes: [{routes}]\n"
            f"}}\n"
        )
        path = self.root / node.name / "nats.conf"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    async def start(self) -> None:
        """Start every node and wait for the JetStream meta leader."""
        for node in self.nodes:
            self._spawn(node)
        for node in self.nodes:
            await self._wait_listening(node)
        await self.wait_meta_leader()

    async def start_node(self, name: str) -> None:
        """(Re)start one node on its ports and store and wait until it accepts clients."""
        node = self.node(name)
        self._spawn(node)
        await self._wait_listening(node)

    def _spawn(self, node: ClusterNode) -> None:
        if node.running:
            raise RuntimeError(f"{node.name} is already running")
        if self._binary is None:
            self._binary = find_nats_server()
        config = self._config(node)
        log = (self.root / node.name / "server.log").open("ab")
        try:
            node.proc = subprocess.Popen([self._binary, "-c", str(config)], stdout=log, stderr=log)
        finally:
            log.close()

    async def _wait_listening(self, node: ClusterNode) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + NODE_START_S
        while loop.time() < deadline:
            if node.proc is None or node.proc.poll() is not None:
                raise RuntimeError(f"{node.name} exited at start: {self.log_tail(node.name)}")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection(HOST, node.port)
                writer.close()
                await writer.wait_closed()
                return
            await asyncio.sleep(POLL_S)
        raise RuntimeError(f"{node.name} did not listen within {NODE_START_S:g} s: {self.log_tail(node.name)}")

    def kill(self, name: str) -> None:
        """`kill -9` one node: no leadership transfer, no flush."""
        node = self.node(name)
        if node.proc is not None:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait()
            node.proc = None

    async def stop_node(self, name: str) -> None:
        """SIGTERM one node (it hands its leaderships over) and wait for it to exit."""
        node = self.node(name)
        proc, node.proc = node.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        """Kill every node that is still running (end of a test or bench)."""
        for node in self.nodes:
            if node.proc is not None:
                node.proc.kill()
                node.proc.wait()
                node.proc = None

    async def jsz(self, name: str) -> dict[str, Any] | None:
        """One node's `/jsz` monitoring answer; None when it does not answer."""
        node = self.node(name)
        if not node.running:
            return None
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as http,
                http.get(f"http://{HOST}:{node.http_port}/jsz") as resp,
            ):
                body: dict[str, Any] = await resp.json(content_type=None)
                return body
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def meta_leader(self) -> str | None:
        """The JetStream meta leader's `server_name` as a running node sees it, once all running nodes agree."""
        leaders = set()
        for node in self.nodes:
            if not node.running:
                continue
            body = await self.jsz(node.name)
            leader = ((body or {}).get("meta_cluster") or {}).get("leader")
            if not leader:
                return None
            leaders.add(leader)
        if len(leaders) != 1:
            return None
        (leader,) = leaders
        return leader if self.node(leader).running else None

    async def wait_meta_leader(self, within: float = LEADER_WAIT_S) -> tuple[str, float]:
        """Wait until every running node names one running meta leader; its name and the seconds it took."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while (leader := await self.meta_leader()) is None:
            if loop.time() - started > within:
                raise RuntimeError(f"no JetStream meta leader within {within:g} s")
            await asyncio.sleep(POLL_S)
        return leader, loop.time() - started

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.root / name / "server.log"
        try:
            return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
