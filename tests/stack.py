"""The production stack's parts as tests start them on 127.0.0.1: PostgreSQL (initdb into a
temporary directory, ``pg_ctl``, a free port; no system service) and an MLflow server the way
k8s/base/mlflow.yaml runs it (``postgresql://USER@HOST:PORT/DB``, artifacts proxied to S3,
``--workers 2``). Each can be stopped and started again on the same port and data, which the
restart tests need."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

PG_LIB = Path("/usr/lib/postgresql")  # Debian: /usr/lib/postgresql/<major>/bin
KEYS = {"AWS_ACCESS_KEY_ID": "unitoken-test", "AWS_SECRET_ACCESS_KEY": "unitoken-test-secret"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url, proc, what, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{what} did not start")


@dataclass
class SeaweedFS:
    """``weed mini`` (S3 on ``port``) on a data directory, restartable on the same port and data."""
    root: Path
    port: int = field(default_factory=_port)
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SeaweedFS:
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        (self.root / "weed").mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([weed, "mini", f"-dir={self.root / 'weed'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                                      "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
                                      f"-s3.port={self.port}", "-s3.port.iceberg=0", "-s3.port.lance=0"],
                                     env={**os.environ, **KEYS}, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        _wait(self.endpoint, self.proc, "SeaweedFS")
        return self

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            **{k.lower(): v for k, v in KEYS.items()})

    def bucket(self, name: str = "mlflow") -> None:
        """Create ``name`` (the filer may need a moment after the port opens)."""
        client = self.client()
        for _ in range(60):
            try:
                client.create_bucket(Bucket=name)
                return
            except Exception:  # noqa: BLE001 - not ready yet, or it exists after a restart
                try:
                    client.head_bucket(Bucket=name)
                    return
                except Exception:  # noqa: BLE001
                    time.sleep(0.5)
        raise RuntimeError(f"SeaweedFS at {self.endpoint}: bucket {name!r} could not be created")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()


def pg_tool(tool: str) -> str | None:
    """``tool`` on PATH, else the newest Debian PostgreSQL's (its binaries are off PATH there)."""
    found = sorted(PG_LIB.glob(f"*/bin/{tool}"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    return shutil.which(tool) or (str(found[-1]) if found else None)


def have_postgres() -> bool:
    return all(pg_tool(t) for t in ("initdb", "pg_ctl", "createdb"))


def _as_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as nobody when this runs as root."""
    return ["runuser", "-u", "nobody", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class Postgres:
    """One PostgreSQL cluster in a temporary directory (not under pytest's root: that is private
    to root, and the server runs as nobody)."""
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="unitoken-pg-")))
    port: int = field(default_factory=_port)

    def __post_init__(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.root, "nobody")
        subprocess.run(_as_user([pg_tool("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                                 "-E", "UTF8"]), check=True, capture_output=True)
        self.start()
        subprocess.run(_as_user([pg_tool("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                                 "mlflow"]), check=True, capture_output=True)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def uri(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/mlflow"

    def start(self) -> None:
        subprocess.run(_as_user([pg_tool("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "pg.log"), "-w", "-o",
                                 f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1", "start"]),
                       check=True, capture_output=True)

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(_as_user([pg_tool("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"]),
                       capture_output=True)

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class MlflowServer:
    """``mlflow server`` on ``backend`` with artifacts at ``artifacts`` (an ``s3://`` destination,
    proxied through the server as in k8s/, or a local path), restartable on the same port."""
    backend: str
    artifacts: str
    s3_endpoint: str | None = None
    workers: int = 2
    port: int = field(default_factory=_port)
    log: Path | None = None
    proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> MlflowServer:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        where = ["--default-artifact-root", self.artifacts]
        if self.s3_endpoint:
            env.update(KEYS, MLFLOW_S3_ENDPOINT_URL=self.s3_endpoint)
            where = ["--artifacts-destination", self.artifacts]
        out = open(self.log, "a") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend,
                                      *where, "--host", "127.0.0.1", "--port", str(self.port),
                                      "--workers", str(self.workers)],
                                     env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        _wait(f"{self.uri}/health", self.proc, f"mlflow server on {self.backend.split(':')[0]}", timeout=timeout)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()
