"""A real multi-node Ray cluster for tests and benchmarks, in a child process.

The cluster (``ray.cluster_utils.Cluster``: a head and more nodes, each a full raylet with its own object
store) runs in a child process (``python tests/helpers/servers/raycluster.py serve NODES CPUS OBJECT_STORE
MEMORY``), so it cannot collide with a test session's own Ray, and drivers join it with ``--address`` as a
user would. The child and the drivers share a private ``RAY_TMPDIR`` (Ray writes the address of the last
cluster it started under it, and ``ray.init()`` without an address would join that cluster) and the same
token authentication settings (Ray 2.60 turns token auth on for clusters that ``ray.init()`` starts; nodes
and drivers must agree)::

    with LocalCluster(nodes=2, num_cpus=1) as cluster:
        subprocess.run([..., "--address", cluster.address], env=cluster.env)
"""

from __future__ import annotations

import json
import os
import re
import secrets
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

ROOT = (
    Path(__file__).resolve().parents[3]
)  # the repository (this file also runs as a script: no imports of tests)


def serve(nodes: int, node: dict) -> None:
    """Start a cluster of ``nodes`` nodes with resources ``node`` each, print its address, stop when stdin
    closes."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(**node)
        cluster.wait_for_nodes()
        print(json.dumps({"address": cluster.address}), flush=True)
        sys.stdin.read()
    finally:
        cluster.shutdown()


class LocalCluster:
    """The child process running :func:`serve`, and the environment (``env``) a driver needs to join it.
    ``extra_env`` goes to the cluster and the drivers (AWS_* for an S3 server; the caller's are left out)."""

    def __init__(
        self,
        nodes: int = 2,
        num_cpus: int = 1,
        object_store_memory: int = 200 * 1024**2,
        memory: int = 2 * 1024**3,
        extra_env: dict[str, str] | None = None,
        start_timeout: float = 180,
    ):
        self.nodes = nodes
        self.tmp = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # short: Ray's Unix socket paths live under it
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RAY_AUTH", "AWS_")) and k != "RAY_ADDRESS"
        }
        self.env.update(
            RAY_TMPDIR=self.tmp,
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=secrets.token_hex(16),
            **(extra_env or {}),
        )
        t0 = time.perf_counter()
        with open(Path(self.tmp) / "serve.log", "w") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "serve",
                    str(nodes),
                    str(num_cpus),
                    str(object_store_memory),
                    str(memory),
                ],
                env=self.env,
                cwd=ROOT,
                text=True,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        try:
            self.address = json.loads(self._readline(start_timeout))["address"]
        except BaseException:
            self.close()
            raise
        self.start_seconds = round(time.perf_counter() - t0, 2)

    def _readline(self, timeout: float) -> str:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout) or not (line := self.proc.stdout.readline()):
            log = (Path(self.tmp) / "serve.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(
                f"the {self.nodes}-node Ray cluster did not answer within {timeout:.0f} s:\n{log}"
            )
        return line

    def nodes_that_ran(self, task: str) -> set[str]:
        """Node ids of the worker processes that ran ``task``, read from the Ray session's logs.

        Each worker's ``worker-<worker id>-<job>-<pid>.out`` names the tasks it ran (``:task_name:``
        lines) and its ``python-core-worker-<worker id>_<pid>.log`` names its node.
        """
        logs = Path(self.tmp) / "ray" / "session_latest" / "logs"
        nodes = set()
        for out in logs.glob("worker-*.out"):
            if f":task_name:{task}" not in out.read_text(errors="replace"):
                continue
            try:
                worker, _, pid = out.stem.removeprefix("worker-").split("-")
                core = (logs / f"python-core-worker-{worker}_{pid}.log").read_text(errors="replace")
                nodes.add(re.search(r"node_id=([0-9a-f]+)", core).group(1))
            except (OSError, ValueError, AttributeError):
                continue
        return nodes

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child only
            self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    n, cpus, store, mem = (int(a) for a in sys.argv[2:6])
    serve(n, {"num_cpus": cpus, "object_store_memory": store, "memory": mem})
