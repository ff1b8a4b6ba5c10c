"""The registry's concurrency on both tracking stores (issue 35): MLflow on SQLite, as the tests and
`make demo` run it, and on PostgreSQL, as k8s/ runs it (artifacts on SeaweedFS either way).
Promoters racing with the same --expect-current: exactly one wins, every time, and no ledger record
is lost; one hand-off registered by several processes at once: one version stands."""

from __future__ import annotations

import json
import threading

import pytest

from tests.conftest import _env, run
from tests.registry.conftest import distinct_handoff

pytestmark = pytest.mark.slow


def _register(backend, name: str, model: str) -> str:
    out = run(backend, "registry", "register", "--model", model, "--eval", backend["eval"], "--gate", backend["gate"],
              "--name", name, inprocess=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["version"]


def _race(name: str, target: str, current: str, racers: int, label: str) -> tuple[list, list]:
    """``racers`` threads promote ``name`` to ``target`` at once, each expecting ``current``;
    (wins, errors other than the expected conflict)."""
    from unitoken import registry

    start, wins, other = threading.Barrier(racers), [], []

    def promoter(i: int) -> None:
        start.wait()
        try:
            wins.append(registry.promote(name, target, expect_current=current, reason=f"{label} racer {i}"))
        except registry.ConflictError:
            pass
        except Exception as err:  # noqa: BLE001 - anything but a conflict fails the test below
            other.append(repr(err))

    threads = [threading.Thread(target=promoter, args=(i,)) for i in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return wins, other


# make test-all (both stores; make test's 15 minutes): eight promoters 20 times, and 5 (the quick
# look). make test races two `unitoken registry promote` processes (tests/registry/test_registry.py).
@pytest.mark.extended
@pytest.mark.parametrize("eights", [5, 20])
def test_racing_promoters_exactly_one_wins_every_time(backend, monkeypatch, eights):
    """Two promoters five times, then eight promoters ``eights`` times, all with the same
    --expect-current: one winner each time, the alias where it moved it, one ledger record per
    race (none lost, none doubled), the history unbroken."""
    from mlflow import MlflowClient

    from unitoken import registry

    for k, v in _env(backend).items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(backend["tmp"])
    name = f"race-{backend['backend']}-{eights}"
    a = _register(backend, name, backend["model"])
    b = _register(backend, name, distinct_handoff(backend, f"race-{backend['backend']}-{eights}", backend["model"]))
    registry.promote(name, a, expect_current="none")
    client, current = MlflowClient(tracking_uri=backend["uri"]), a
    races = [(2, r) for r in range(5)] + [(8, r) for r in range(eights)]
    for n, (racers, r) in enumerate(races, start=1):
        target = b if current == a else a
        wins, other = _race(name, target, current, racers, f"race {n}")
        assert not other, other
        assert len(wins) == 1, f"race {n} ({racers} promoters): {len(wins)} winners"
        assert client.get_registered_model(name).aliases["champion"] == target
        current = target
    moves = registry.history(name)
    assert len(moves) == 1 + len(races) and all(m["action"] == "promote" for m in moves)
    assert all(str(m["from"]) == str(prev["to"]) for prev, m in zip(moves, moves[1:]))
    records = registry.aliases._records(client, name, "champion")
    assert sorted(records) == list(range(len(races) + 1))
    assert {r.get("status", "done") for r in records.values()} == {"done"}


def test_one_handoff_registered_by_three_processes_at_once_leaves_one_version(backend):
    """Search-then-create let both of two racing registrations create a version; now each looks
    again after creating, and all but the lowest withdraw theirs."""
    from mlflow import MlflowClient

    from unitoken.model.handoff import handoff_digest
    from unitoken.registry.common import HANDOFF_TAG

    name, model = f"dup-{backend['backend']}", distinct_handoff(backend, f"dup-{backend['backend']}", backend["model"])
    _register(backend, name, backend["model"])  # the model exists: the racers race on its versions alone
    procs = [run(backend, "registry", "register", "--model", model, "--eval", backend["eval"], "--gate", backend["gate"],
                 "--name", name, popen=True) for _ in range(3)]
    outs = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    assert [code for code, _, _ in outs] == [0, 0, 0], [err[-2000:] for _, _, err in outs]
    infos = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in outs]
    client = MlflowClient(tracking_uri=backend["uri"])
    digest = handoff_digest(backend["tmp"] / model)
    found = client.search_model_versions(f"name = '{name}' and tags.`{HANDOFF_TAG}` = '{digest}'")
    assert len(found) == 1, [v.version for v in found]
    assert {i["version"] for i in infos} == {str(found[0].version)}
    assert sorted(i["duplicate"] for i in infos).count(False) == 1
    assert client.get_registered_model(name).aliases["challenger"] == str(found[0].version)
    assert {i["run_id"] for i in infos} == {found[0].run_id}  # every racer names the winner's run
    # a racer that had created a version before it saw the winner says so on its own run
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.`unitoken.duplicate_of` != ''")
    assert {r.data.tags["unitoken.duplicate_of"] for r in runs} <= {f"models:/{name}/{found[0].version}"}
    every = client.search_model_versions(f"name = '{name}'")
    assert len(every) == 2  # s3/handoff's and the raced one's: nothing else left behind


@pytest.mark.extended
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)  # SQLite's: the `champion` fixture
def test_a_pipeline_run_with_promote_on_postgresql(backend, tmp_path):
    """`unitoken pipeline run --local --promote` against MLflow on PostgreSQL: registered, gated,
    promoted, and the champion's lineage verifies against the store (its own step cache: a cache
    filled against another tracking store would name runs this one does not have)."""
    from mlflow import MlflowClient

    from tests.registry.conftest import FAST, NAME

    here = {**backend, "tmp": tmp_path}
    run(here, "pipeline", "run", "--local", "--scenes", "40", "--promote", *FAST)
    client = MlflowClient(tracking_uri=backend["uri"])
    champion = client.get_registered_model(NAME).aliases["champion"]
    lineage = run(here, "lineage", f"models:/{NAME}@champion")
    assert lineage.returncode == 0 and champion
    from unitoken import registry

    moves = registry.history(NAME, client=client)
    assert moves and str(moves[-1]["to"]) == str(champion) and moves[-1]["action"] != registry.common.OUTSIDE


@pytest.mark.extended
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)  # SQLite's: tests/registry/test_registry.py
def test_register_promote_rollback_history_lineage_and_tampering_on_postgresql(backend):
    """The registry's whole flow of test_registry.py on the PostgreSQL store: register (challenger),
    promote, a second version promoted over it with --expect-current, rollback, the history, the
    lineage; a tampered stored report breaks the lineage and the promotion."""
    from mlflow import MlflowClient

    name, client = "flow-postgresql", MlflowClient(tracking_uri=backend["uri"])
    v1 = _register(backend, name, backend["model"])
    assert client.get_registered_model(name).aliases == {"challenger": v1}
    run(backend, "registry", "promote", name, "--version", v1, "--expect-current", "none", inprocess=True)
    v2 = _register(backend, name, distinct_handoff(backend, "flow-postgresql", backend["model"]))
    run(backend, "registry", "promote", name, "--version", v2, "--expect-current", v1, "--reason", "better",
        inprocess=True)
    assert client.get_registered_model(name).aliases["champion"] == v2
    run(backend, "registry", "rollback", name, inprocess=True)
    assert client.get_registered_model(name).aliases["champion"] == v1
    out = run(backend, "registry", "history", name, inprocess=True).stdout
    assert "rollback" in out and "better" in out
    lin = json.loads(run(backend, "lineage", f"models:/{name}@champion", "--json", inprocess=True).stdout)
    assert lin["ok"] and [e["stage"] for e in lin["passport"] if e["kind"] == "stage"] == [1, 2, 3]
    mv = client.get_model_version(name, v2)  # not the champion: promoting it verifies it
    s3, run_id = backend["s3"], mv.tags["unitoken.registration_run"]
    key = next(o["Key"] for o in s3.list_objects_v2(Bucket="mlflow", Prefix="artifacts-pg")["Contents"]
               if run_id in o["Key"] and o["Key"].endswith("eval/report.json"))
    original = s3.get_object(Bucket="mlflow", Key=key)["Body"].read()
    s3.put_object(Bucket="mlflow", Key=key, Body=original.replace(b'"overall": ', b'"overall": 0.99 + '))
    try:
        assert run(backend, "lineage", f"models:/{name}/{v2}", check=False, inprocess=True).returncode == 1
        promo = run(backend, "registry", "promote", name, "--version", v2, check=False, inprocess=True)
        assert promo.returncode == 1 and "refusing to promote" in " ".join(promo.stderr.split())
    finally:
        s3.put_object(Bucket="mlflow", Key=key, Body=original)
