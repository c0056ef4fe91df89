"""A real S3-compatible server for tests: moto's server on 127.0.0.1 on a free port, in its own
process, stopped by its PID. Clients reach it through the standard AWS environment variables
(pyarrow, boto3, Ray and MLflow all honour ``AWS_ENDPOINT_URL``)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """``moto_server`` on 127.0.0.1; ``env`` is what a client needs to reach it."""

    def __init__(self, log: Path, **server_env: str) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(self.port)],
            env={**os.environ, **server_env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                break
            except urllib.error.HTTPError:
                break  # it answers (a server that checks credentials refuses the probe)
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto_server did not start; see {log}") from None
                time.sleep(0.2)

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **_keys(self.env))

    def bucket(self, prefix: str = "gist") -> str:
        """A new empty bucket; its ``s3://`` URI."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, uri: str) -> list[str]:
        """Every object key under ``uri`` (s3://bucket[/prefix]), without the empty ``dir/``
        markers pyarrow leaves so that a folder it emptied still lists."""
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        out, token = [], None
        while True:
            kw = {"Bucket": bucket, "Prefix": prefix}
            if token:
                kw["ContinuationToken"] = token
            page = self.client().list_objects_v2(**kw)
            out += [o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
            token = page.get("NextContinuationToken")
            if not token:
                return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


def _keys(env: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }


def next_second() -> None:
    """Wait for the next second: S3 lists modification times to the second, so an object
    rewritten in the second its original was written lists with the original's time."""
    time.sleep(1.05 - time.time() % 1)


def local_s3_folders(root: str | os.PathLike) -> list[Path]:
    """Folders named ``s3:`` under ``root``: what ``Path("s3://b/k")`` would have created."""
    return [p for p in Path(root).rglob("s3:") if p.is_dir()]
