"""The registry's compare-and-swap on MLflow over PostgreSQL, the store k8s/ runs it on (issue 35,
first part): the test starts PostgreSQL itself on 127.0.0.1 (initdb into a temporary directory,
`pg_ctl`, a free port, as an unprivileged user when run as root; no system service) and the MLflow
server on it with the backend URI k8s/base/mlflow.yaml gives it (`postgresql://USER@HOST:PORT/DB`,
psycopg 3 as in our image: SQLAlchemy 2.1 reads ``postgresql://`` with it; with psycopg2, as the
image had it, the server did not start: "No module named 'psycopg'"). Eight promoters claim the same move at once: exactly one claim is stored.
Not in `make test` (its 15 minutes); `make test-all` runs it."""

from __future__ import annotations

import threading

import pytest

from tests.stack import MlflowServer, Postgres, have_postgres

pytestmark = pytest.mark.extended


@pytest.fixture(scope="module")
def mlflow_on_postgres(tmp_path_factory):
    if not have_postgres():
        pytest.skip("PostgreSQL (initdb, pg_ctl, createdb) is not installed")
    pg = Postgres()
    server = MlflowServer(pg.uri, (tmp_path_factory.mktemp("mlflow-pg") / "artifacts").as_uri()).start()
    yield server.uri
    server.kill()
    pg.close()


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
