"""Promotion is a compare-and-swap with no lock models, and a promoter SIGKILLed at any step leaves a
state the next `promote` completes or rolls back. Real MLflow server, real S3 (SeaweedFS)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import _env, run
from tests.registry.conftest import distinct_handoff

pytestmark = pytest.mark.slow

# Runs one promotion in a fresh process and SIGKILLs it just before or after the first call of an
# MlflowClient method whose second argument (the param key, alias or tag key) starts with PREFIX.
KILLER = """
import os, signal, sys
from mlflow import MlflowClient
from unitoken import registry

method, prefix, when, name, version = sys.argv[1:]
original = getattr(MlflowClient, method)

def dying(self, *args, **kwargs):
    hit = str(args[1]).startswith(prefix)
    if hit and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    out = original(self, *args, **kwargs)
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)
    return out

setattr(MlflowClient, method, dying)
registry.promote(name, version, "champion", reason="killed mid-way")
"""

CASES = {  # where the promoter dies -> what the next promotion records for the killed move
    "before-claim": ("log_param", "champion.", "before", None),
    "after-claim": ("log_param", "champion.", "after", "rolled back"),
    "after-alias-move": ("set_registered_model_alias", "champion", "after", "completed"),
    "after-record": ("set_registered_model_tag", "unitoken.history.champion.", "after", "done"),
}


def _register(servers, name: str, model: str = "s3/handoff") -> str:
    out = run(servers, "registry", "register", "--model", model, "--eval", servers.get("eval", "e"),
              "--gate", servers.get("gate", "gate.json"), "--name", name, inprocess=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["version"]


def _two_versions(servers, name: str) -> tuple[str, str]:
    """Versions 1 and 2 of ``name``: two distinct hand-offs (one version per hand-off)."""
    model = servers.get("model", "s3/handoff")
    return (_register(servers, name, model),
            _register(servers, name, distinct_handoff(servers, f"second-{servers['backend']}", model)))


@pytest.mark.parametrize("case", list(CASES))
def test_a_promoter_killed_at_any_step_leaves_a_state_the_next_promote_settles(backend, monkeypatch, case):
    """On both tracking stores (SQLite, PostgreSQL)."""
    servers = backend
    from mlflow import MlflowClient

    from unitoken import registry

    for k, v in _env(servers).items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(servers["tmp"])
    client = MlflowClient(tracking_uri=servers["uri"])
    method, prefix, when, status = CASES[case]
    name = f"killed-{case}-{servers['backend']}"
    v1, v2 = _two_versions(servers, name)
    registry.promote(name, v1, expect_current="none")
    killed = subprocess.run([sys.executable, "-c", KILLER, method, prefix, when, name, v2], cwd=servers["tmp"],
                            env=_env(servers), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    moved = case in ("after-alias-move", "after-record")
    assert client.get_registered_model(name).aliases["champion"] == (v2 if moved else v1)
    if status in ("rolled back", "completed"):  # a claim with no record: within the lease it is "in progress"
        with pytest.raises(registry.ConflictError, match="in progress"):
            registry.promote(name, v2)
    monkeypatch.setenv("UNITOKEN_PROMOTION_LEASE_S", "0")
    registry.promote(name, v2, reason="after the kill")
    assert client.get_registered_model(name).aliases["champion"] == v2
    moves = registry.history(name)
    assert [(m["from"], m["to"]) for m in moves] == [(None, v1), (v1, v2)]
    records = registry.aliases._records(client, name, "champion")
    assert [r.get("status") for _, r in sorted(records.items())] == (["done", status, "done"] if status == "rolled back"
                                                                    else ["done"] + ([status] if status else ["done"]))
    assert all(m["action"] != registry.common.OUTSIDE for m in moves)
    # settled: the next promotion within the default lease is not blocked
    monkeypatch.delenv("UNITOKEN_PROMOTION_LEASE_S")
    registry.promote(name, v1, expect_current=v2, reason="back")
    assert client.get_registered_model(name).aliases["champion"] == v1


def test_the_registry_lists_only_real_models_and_outside_moves_show_in_history(servers, registered, monkeypatch):
    from mlflow import MlflowClient

    from unitoken import registry

    for k, v in _env(servers).items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(servers["tmp"])
    client = MlflowClient(tracking_uri=servers["uri"])
    name = "outside"
    v1, v2 = _two_versions(servers, name)
    registry.promote(name, v1, expect_current="none")
    client.set_registered_model_alias(name, "champion", v2)  # as the MLflow UI does
    moves = registry.history(name)
    assert [(m["action"], m["from"], m["to"]) for m in moves] == [("promote", None, v1), (registry.common.OUTSIDE, v1, v2)]
    shown = run(servers, "registry", "history", name, inprocess=True).stdout
    assert "outside the CLI" in " ".join(shown.split())
    with pytest.raises(registry.ConflictError, match=f"held by version {v2}, not {v1}"):
        registry.promote(name, v1, expect_current=v1)
    registry.promote(name, v1, expect_current=v2, reason="undo the UI's move")
    moves = registry.history(name)
    assert [(m["action"], m["from"], m["to"]) for m in moves] == [("promote", None, v1), (registry.common.OUTSIDE, v1, v2),
                                                                  ("promote", v2, v1)]
    names = {m.name for m in client.search_registered_models()}
    assert not [n for n in names if ".lock." in n] and name in names
    ledgers = client.search_runs([client.get_experiment_by_name(registry.common.LEDGER_EXPERIMENT).experiment_id],
                                 f"tags.`unitoken.registered_model` = '{name}'")
    assert len(ledgers) == 1 and ledgers[0].data.params  # one ledger run, holding the claims


def test_history_is_honest_about_register_no_ops_unchecked_promotes_and_missing_aliases(servers, registered,
                                                                                        monkeypatch):
    """`register` records its challenger moves (no "outside the CLI" rows); promoting to the holder
    moves and records nothing; `promote` without --expect-current swaps against the holder it read
    and says so; rolling back an alias that does not exist names the aliases there are; history
    wraps its columns at 80 characters instead of cutting them, and shows "-" for an unset alias."""
    from unitoken import registry

    for k, v in _env(servers).items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(servers["tmp"])
    name = "honest"
    v1, v2 = _two_versions(servers, name)
    challenger = registry.history(name, "challenger")
    assert [(m["action"], m["from"], m["to"]) for m in challenger] == [("register", None, v1), ("register", v1, v2)]

    first = registry.promote(name, v1)
    assert (first["action"], first["from"], first["to"]) == ("promote", None, v1)
    assert first["checked"] == "the holder read before the move"
    again = registry.promote(name, v1, expect_current=v1)
    assert again["action"] == "none" and "nothing moved, nothing recorded" in again["note"]
    out = run(servers, "registry", "promote", name, "--version", v2, "--reason", "a reason long enough to wrap " * 3,
              inprocess=True).stdout
    assert f"moved {v1} -> {v2} (compare-and-swap against {v1}: the holder read before the move)" in " ".join(out.split())
    assert [(m["action"], m["from"], m["to"]) for m in registry.history(name)] == [("promote", None, v1),
                                                                                 ("promote", v1, v2)]
    back = registry.rollback(name)
    assert (back["action"], back["from"], back["to"]) == ("rollback", v2, v1)

    with pytest.raises(registry.RegistryError, match=r"honest has no alias 'staging' \(its aliases: challenger, champion\)"):
        registry.rollback(name, alias="staging")
    shown = run(servers, "registry", "history", name, inprocess=True).stdout  # rich's width off a terminal: 80
    assert max(len(line) for line in shown.splitlines()) <= 80
    assert shown.count("wrap") == 3 and shown.count("enough") == 3  # the whole reason, wrapped, not cut
    assert "None" not in shown and " - " in shown
