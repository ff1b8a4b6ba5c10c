"""The registry's compare-and-swap on MLflow over PostgreSQL, the store k8s/ runs it on (issue 35,
first part): the test starts PostgreSQL itself on 127.0.0.1 (initdb into a temporary directory,
`pg_ctl`, a free port, as an unprivileged user when run as root; no system service) and the MLflow
server on it with the backend URI k8s/base/mlflow.yaml gives it (`postgresql://USER@HOST:PORT/DB`,
psycopg 3 as in our image: SQLAlchemy 2.1 reads ``postgresql://`` with it; with psycopg2, as the
image had it, the server did not start: "No module named 'psycopg'"). Eight promoters claim the same move at once: exactly one claim is stored.
Not in `make test` (its 15 minutes); `make test-all` runs it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from tests.conftest import _port, _wait

pytestmark = pytest.mark.extended
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _pg(tool: str) -> str | None:
    return shutil.which(tool) or (str(PG_BIN / tool) if (PG_BIN / tool).is_file() else None)


def _as_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as nobody when this runs as root."""
    return ["runuser", "-u", "nobody", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres():
    if _pg("initdb") is None or _pg("pg_ctl") is None:
        pytest.skip("PostgreSQL (initdb, pg_ctl) is not installed")
    # not under pytest's temporary root: it is private to root, and the server runs as nobody
    root = Path(tempfile.mkdtemp(prefix="unitoken-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "nobody")
    port = _port()
    subprocess.run(_as_user([_pg("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
                   check=True, capture_output=True)
    subprocess.run(_as_user([_pg("pg_ctl"), "-D", str(data), "-l", str(root / "pg.log"), "-w", "-o",
                             f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"]), check=True,
                   capture_output=True)
    subprocess.run(_as_user([_pg("createdb") or str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port),
                             "-U", "postgres", "mlflow"]), check=True, capture_output=True)
    yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    subprocess.run(_as_user([_pg("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]), capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_on_postgres(postgres, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow-pg")
    port = _port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    ml = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres,
                           "--default-artifact-root", (tmp / "artifacts").as_uri(), "--host", "127.0.0.1",
                           "--port", str(port), "--workers", "2"], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
    _wait(f"http://127.0.0.1:{port}/health", ml, "mlflow server on PostgreSQL", timeout=180)
    yield f"http://127.0.0.1:{port}"
    os.killpg(ml.pid, signal.SIGKILL)
    ml.wait()


def test_eight_racing_claims_of_one_move_store_exactly_one(mlflow_on_postgres):
    """The primitive under `promote`'s compare-and-swap: a run's param is immutable, so of eight
    promoters logging the same ledger key with different values exactly one value is stored, and
    each promoter learns whether it was its own."""
    from mlflow import MlflowClient

    from unitoken.registry.aliases import _claim_param

    client = MlflowClient(tracking_uri=mlflow_on_postgres)
    ledger = client.create_run(client.create_experiment("ledger-race")).info.run_id
    results: dict[int, bool] = {}
    start = threading.Barrier(8)

    def promoter(i: int) -> None:
        start.wait()
        results[i] = _claim_param(MlflowClient(tracking_uri=mlflow_on_postgres), ledger, "champion.1", f"to-v{i}")

    threads = [threading.Thread(target=promoter, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, won in results.items() if won]
    assert len(results) == 8 and len(winners) == 1, results
    assert client.get_run(ledger).data.params["champion.1"] == f"to-v{winners[0]}"
