"""The registry tests share one trained, evaluated and gated candidate (registered as "shapes")."""

import json
import shutil

import pytest

from tests.conftest import run

NAME = "unitoken"  # what the pipeline registers
FAST = ["--param", "tokenizer_steps=3", "--param", "max_steps=2", "--param", "eval_limit=2"]


@pytest.fixture(scope="session")
def registered(trained):
    servers = trained
    run(servers, "eval", "--model", "s3/handoff", "--suite", "shapes-vqa,shapes-geneval", "--data", "d", "--out", "e",
        "--limit", "3", "--device", "cpu", "--heldout-tokens", "p", "--heldout-limit", "4")
    run(servers, "gate", "--candidate", "e", "--out", "gate.json", inprocess=True)
    out = run(servers, "registry", "register", "--model", "s3/handoff", "--eval", "e", "--gate", "gate.json",
              "--name", "shapes", inprocess=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def local_store(local_home, local_run):
    """The store `make demo` leaves (sqlite under .unitoken/, artifacts beside it), after the
    session's local pipeline run registered and promoted ``unitoken``: ``tmp`` (its directory),
    ``uri`` (what README says to export) and ``data`` (the pipeline's synthetic data)."""
    return {"tmp": local_home, "uri": f"sqlite:///{local_home / '.unitoken' / 'mlflow.db'}",
            "data": local_home / ".unitoken" / "pipeline" / "data"}


@pytest.fixture(scope="session")
def champion(local_store):
    """The champion version the local pipeline run promoted (``models:/unitoken@champion`` there)."""
    from mlflow import MlflowClient

    return str(MlflowClient(tracking_uri=local_store["uri"]).get_registered_model(NAME).aliases["champion"])


@pytest.fixture(scope="session")
def local_ui(local_store):
    """`mlflow server` on that store, as `mlflow ui --backend-store-uri` serves it to a user; its URL."""
    from tests.stack import MlflowServer

    server = MlflowServer(local_store["uri"], (local_store["tmp"] / ".unitoken" / "artifacts").as_uri(),
                          workers=1, log=local_store["tmp"] / "mlflow-ui.log").start()
    yield server.uri
    server.kill()


def distinct_handoff(servers, label: str, src: str = "s3/handoff") -> str:
    """A second hand-off to register beside s3/handoff (the registry keeps one version per
    hand-off): the same files, with a handoff.json of its own that says it is a copy. The copy
    names no training run (stage 3's run records the original's digest), so its lineage shows
    stage 3 without a run. Returns its path relative to the servers' directory."""
    from unitoken.files import write_json
    from unitoken.model.handoff import HANDOFF, handoff_digest

    src, rel = servers["tmp"] / src, f"copies/{label}"
    dst = servers["tmp"] / rel
    if not dst.is_dir():
        shutil.copytree(src, dst)
        doc = json.loads((src / HANDOFF).read_text())
        write_json(dst / HANDOFF, {**doc, "mlflow_run_id": None, "copy_of": handoff_digest(src), "copy_label": label})
    return rel


# PostgreSQL: `make test-all` (its server and its own trained candidate cost ~6 minutes of make test's 15)
@pytest.fixture(scope="session", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.extended)])
def backend(request, servers, registered):
    """The test servers (MLflow on SQLite, artifacts on SeaweedFS) with their registered candidate,
    or an MLflow server on PostgreSQL as k8s/ runs it, its artifacts proxied to the same
    SeaweedFS, with a candidate of its own: the stages trained (3 steps each, on the same data),
    evaluated and gated against it, since promotion verifies every stage's run in the store.
    ``model``, ``eval`` and ``gate``: the candidate's files, relative to ``tmp``."""
    if request.param == "sqlite":
        yield {**servers, "model": "s3/handoff", "eval": "e", "gate": "gate.json"}
        return
    from tests.stack import MlflowServer, Postgres, have_postgres

    if not have_postgres():
        pytest.skip("PostgreSQL (initdb, pg_ctl, createdb) is not installed: apt-get install postgresql")
    pg = Postgres()
    server = MlflowServer(pg.uri, "s3://mlflow/artifacts-pg", s3_endpoint=servers["endpoint"],
                          log=servers["tmp"] / "mlflow-pg.log").start()
    on_pg = {**servers, "uri": server.uri, "backend": "postgresql", "pg": pg, "mlflow": server,
             "model": "pg/s3/handoff", "eval": "pg/e", "gate": "pg/gate.json"}
    init = "m"
    for stage in (1, 2, 3):
        run(on_pg, "train", "--stage", str(stage), "--recipe", "tiny", "--data", "p", "--out", f"pg/s{stage}",
            "--init", init, "--max-steps", "3")
        init = f"pg/s{stage}/handoff"
    run(on_pg, "eval", "--model", init, "--suite", "shapes-vqa,shapes-geneval", "--data", "d", "--out", "pg/e",
        "--limit", "3", "--device", "cpu")
    run(on_pg, "gate", "--candidate", "pg/e", "--out", "pg/gate.json", inprocess=True)
    yield on_pg
    server.kill()
    pg.close()
