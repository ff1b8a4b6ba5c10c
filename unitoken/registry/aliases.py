"""Aliases by compare-and-swap (promote, rollback) and their history: the claim -> move -> record
of the package docstring, the ledger run, and the settling of moves a killed promoter left."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import time
import uuid

from unitoken.registry.common import (
    HISTORY,
    LEDGER_EXPERIMENT,
    LEDGER_PARAM,
    MOVED,
    OUTSIDE,
    ConflictError,
    RegistryError,
)
from unitoken.registry.uris import fetch, resolve, verify_version
from unitoken.tracking import store as tracking


def alias_holder(client, name: str, alias: str) -> str | None:
    aliases = client.get_registered_model(name).aliases
    return str(aliases[alias]) if alias in aliases else None


def _records(client, name: str, alias: str) -> dict[int, dict]:
    prefix = f"{HISTORY}.{alias}."
    return {int(k[len(prefix):]): json.loads(v) for k, v in client.get_registered_model(name).tags.items()
            if k.startswith(prefix) and k[len(prefix):].isdigit()}


def _record(client, name: str, alias: str, entry: dict) -> None:
    client.set_registered_model_tag(name, f"{HISTORY}.{alias}.{entry['seq']:06d}", json.dumps(entry))
    client.update_registered_model(name, description=history_markdown(client.get_registered_model(name).tags))


def history_markdown(tags: dict[str, str]) -> str:
    """The registered model's description: every recorded alias move as a Markdown table, newest
    first (the MLflow UI shows no alias history of its own; the records are the model's tags)."""
    moves = [json.loads(v) for k, v in tags.items() if k.startswith(f"{HISTORY}.")]
    moves = sorted((m for m in moves if m.get("status", "done") in MOVED), key=lambda m: m.get("t", 0), reverse=True)
    rows = [f"| {m['when']} | {m['alias']} | {m['action']} | {m['from'] or '-'} | {m['to']} | {m['who']} | "
            f"{str(m.get('reason', '')).replace('|', '/')} |" for m in moves]
    return "\n".join(["**Alias history** (recorded by `unitoken registry`; moves made elsewhere show in "
                      "`unitoken registry history`)", "", "| when | alias | action | from | to | who | reason |",
                      "|---|---|---|---|---|---|---|", *rows])


def history(name: str, alias: str = "champion", client=None) -> list[dict]:
    """The moves of ``alias`` that happened, oldest first. Moves the CLI did not make (the MLflow
    UI, another client) show as rows with action "outside the CLI" wherever one move does not
    start where the previous one ended, or the alias is not where the last one left it. (A move
    whose promoter was killed after moving the alias shows that way too, until the next
    ``promote`` settles its claim as completed.)"""
    client = client or tracking.client()
    moves = [e for _, e in sorted(_records(client, name, alias).items()) if e.get("status", "done") in MOVED]
    out, at = [], None
    for m in moves:
        if out and str(m["from"]) != str(at) or not out and m["from"] is not None:
            out.append(_outside(alias, at, m["from"]))
        out.append(m)
        at = m["to"]
    current = alias_holder(client, name, alias)
    if str(current) != str(at):
        out.append(_outside(alias, at, current))
    return out


def _outside(alias: str, frm, to) -> dict:
    return {"seq": "-", "action": OUTSIDE, "alias": alias, "from": frm, "to": to, "who": "?", "when": "?",
            "reason": "the alias was moved without `unitoken registry`"}


def ledger_run(client, name: str) -> str:
    """The run whose immutable params are ``name``'s alias claims (created on first use, race-free:
    the pointer to it is itself an immutable param of version 1's registration run)."""
    pinned = client.get_registered_model(name).tags.get(LEDGER_PARAM)
    if pinned:  # resolved before: stays put even if the version it was anchored on is deleted
        return pinned
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        raise RegistryError(f"{name}: no registered versions")
    first = min(versions, key=lambda v: int(v.version))
    anchor = first.tags.get("unitoken.registration_run") or first.run_id
    params = client.get_run(anchor).data.params
    if LEDGER_PARAM not in params:
        exp = _ledger_experiment(client)
        ledger = client.create_run(exp, run_name=f"registry-ledger-{name}", tags={
            "unitoken.kind": "registry-ledger", "unitoken.registered_model": name}).info.run_id
        client.set_terminated(ledger, "FINISHED")
        if _claim_param(client, anchor, LEDGER_PARAM, ledger):
            params = {**params, LEDGER_PARAM: ledger}
        else:
            params = client.get_run(anchor).data.params
        if params.get(LEDGER_PARAM) != ledger:  # another promoter's ledger was stored first
            client.delete_run(ledger)
    client.set_registered_model_tag(name, LEDGER_PARAM, params[LEDGER_PARAM])
    return params[LEDGER_PARAM]


def _ledger_experiment(client) -> str:
    exp = client.get_experiment_by_name(LEDGER_EXPERIMENT)
    if exp is None:
        try:
            return client.create_experiment(LEDGER_EXPERIMENT, tags={"mlflow.note.content": (
                "Alias claims of the model registry (one run per registered model, written by `unitoken registry "
                "promote`); do not edit.")})
        except Exception:  # noqa: BLE001 - created by a concurrent promoter: use theirs
            exp = client.get_experiment_by_name(LEDGER_EXPERIMENT)
            if exp is None:
                raise
    return exp.experiment_id


def _claim_param(client, run_id: str, key: str, value: str) -> bool:
    """Log ``key=value`` unless ``key`` holds another value; True when ``value`` is what is stored."""
    try:
        client.log_param(run_id, key, value)
    except Exception:  # noqa: BLE001 - the store refuses a changed param; anything else re-raises below
        stored = client.get_run(run_id).data.params.get(key)
        if stored is None:
            raise
        return stored == value
    return True


def _lease_s() -> float:
    return float(os.environ.get("UNITOKEN_PROMOTION_LEASE_S", "120"))


def settle(client, name: str, alias: str, ledger: str) -> int:
    """Finish what killed promoters left (claims with no record) and return the next move number.

    Raises:
        ConflictError: a claim younger than the lease has no record yet: a promotion is in progress.
    """
    pre = f"{alias}."
    claims = {int(k[len(pre):]): json.loads(v) for k, v in client.get_run(ledger).data.params.items()
              if k.startswith(pre) and k[len(pre):].isdigit()}
    records = _records(client, name, alias)
    for seq in sorted(set(claims) - set(records)):
        c = claims[seq]
        age = time.time() - c["t"]
        if age < _lease_s():
            raise ConflictError(f"promotion #{seq} of {name}@{alias} to version {c['to']} by {c['who']} is in "
                                f"progress (claimed {age:.0f} s ago); retry after it finishes (or after "
                                f"{_lease_s():.0f} s if it was killed: the next promotion then completes it)")
        holder = alias_holder(client, name, alias)
        if holder == str(c["to"]):
            status, note = "completed", "the promoter stopped after moving the alias; completed by a later promotion"
        elif holder == (None if c["from"] is None else str(c["from"])):
            status, note = "rolled back", "the promoter stopped before moving the alias; nothing was moved"
        else:
            status, note = "interrupted", f"the promoter stopped; the alias is now at {holder}"
        _record(client, name, alias, {**c, "status": status, "note": note})
    return max([*claims, *records], default=-1) + 1


def promote(name: str, version: str, alias: str = "champion", expect_current: str | None = None,
            reason: str = "", action: str = "promote") -> dict:
    """Move ``alias`` to ``version`` if (and only if) it is where the caller expects.

    ``expect_current``: the version the caller expects the alias at (``"none"``: unset); None
    compare-and-swaps against the holder read just before the move (``checked`` in the result
    says which). A move to the version the alias already holds moves nothing and records
    nothing (``action`` "none"). Steps: settle earlier claims -> verify the version -> claim move
    n on the ledger (the CAS) -> move the alias -> record move n. A kill between any two leaves a
    state the next call settles.

    Raises:
        ConflictError: the alias is not where ``expect_current`` says, or another promotion won.
        RegistryError: the version does not verify against its passport.
    """
    client = tracking.client()
    version = str(version)
    mv = resolve(f"models:/{name}/{version}", client)
    ledger = ledger_run(client, name)
    seq = settle(client, name, alias, ledger)
    current = alias_holder(client, name, alias)
    if expect_current is not None and str(expect_current).lower() != str(current).lower():
        raise ConflictError(f"alias {alias!r} of {name} is held by version {current}, not {expect_current}; "
                            "re-read it (unitoken registry history) and retry")
    checked = "--expect-current" if expect_current is not None else "the holder read before the move"
    if current == version:  # e.g. the re-run of a promotion a kill interrupted, or a repeated command
        return {"seq": None, "action": "none", "alias": alias, "from": current, "to": version, "checked": checked,
                "note": f"{name}@{alias} already holds version {version}; nothing moved, nothing recorded"}
    paths = fetch(mv, client)
    try:
        problems = verify_version(mv, paths, client)
    finally:
        shutil.rmtree(paths["root"], ignore_errors=True)
    if problems:
        raise RegistryError(f"refusing to promote {name} v{version}: {problems[0]}")
    return {**move_alias(client, name, alias, version, current, action, reason, ledger, seq), "checked": checked}


def move_alias(client, name: str, alias: str, version: str, current: str | None, action: str, reason: str,
          ledger: str, seq: int) -> dict:
    """Claim move ``seq`` on the ledger (the compare-and-swap against ``current``), move the alias,
    record the move; the recorded entry."""
    entry = {"seq": seq, "action": action, "alias": alias, "from": current, "to": version,
             "who": os.environ.get("UNITOKEN_ACTOR") or getpass.getuser(),
             "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "reason": reason[:1000],
             "t": time.time(), "token": uuid.uuid4().hex}
    # Claim -> move -> record with one HTTP attempt per call (MLflow's own retries can stall a
    # call for minutes): the window another promoter could take for a killed one stays far
    # inside the lease.
    with tracking.fail_fast_http():
        if not _claim_param(client, ledger, f"{alias}.{seq:06d}", json.dumps(entry, ensure_ascii=False)):
            raise ConflictError(f"another promotion of {name}@{alias} moved first (move #{seq}); re-read and retry")
        if alias_holder(client, name, alias) != current:  # moved outside the CLI since we read it
            _record(client, name, alias, {**entry, "status": "abandoned",
                                          "note": "the alias moved during the promotion"})
            raise ConflictError(f"alias {alias!r} of {name} changed during the promotion")
        client.set_registered_model_alias(name, alias, version)
        if seq in _records(client, name, alias):  # settled by another promoter while this one stalled
            raise ConflictError(f"promotion #{seq} of {name}@{alias} took longer than the lease and was settled by "
                                "another promotion; read `unitoken registry history` before retrying")
        _record(client, name, alias, {**entry, "status": "done"})
    return entry


def rollback(name: str, alias: str = "champion", reason: str = "rollback") -> dict:
    """Move ``alias`` back to the version it held before its last move.

    Raises:
        RegistryError: the model has no such alias, or no earlier holder was recorded.
    """
    client = tracking.client()
    current = alias_holder(client, name, alias)
    if current is None:
        aliases = sorted(client.get_registered_model(name).aliases)
        raise RegistryError(f"{name} has no alias {alias!r} (its aliases: {', '.join(aliases) or 'none'}); "
                            f"nothing to roll back; fix: name one with --alias")
    moves = history(name, alias, client)
    if not moves or moves[-1]["from"] is None:
        raise RegistryError(f"{name}@{alias} (version {current}) has no earlier holder; nothing to roll back to; "
                            f"fix: move it with `unitoken registry promote {name} --version N --alias {alias}`")
    return promote(name, moves[-1]["from"], alias, expect_current=current, reason=reason, action="rollback")
