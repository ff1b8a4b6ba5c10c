"""``unitoken lineage --diff A B``: what changed between two registered versions. Per stage its
mixture (sources added or removed, weights, records, samples) and the recipe fields that differ,
the code commit, and the evaluation scores with their 95 % intervals side by side: why a score
moved, where an anchor cannot say.

Everything comes from what registration stored: the passport (each stage's mixture) and the
evaluation report of each version's registration run, and the params each stage's run logged (the
flattened recipe; ``mixture.<source>.<field>`` for versions whose passport has no mixture). A stage
whose run is not on this tracking server shows no recipe fields.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from unitoken.registry.common import RegistryError
from unitoken.registry.uris import resolve
from unitoken.tracking import store as tracking
from unitoken.tracking.store import ArtifactLogError, default_tracking_uri, with_artifact_retries

RECIPE_PREFIXES = ("train.", "model.")


def version_facts(uri: str, client=None) -> dict:
    """{"uri", "name", "version", "commit", "package_version", "stages": {n: {"run", "mixture", "recipe"}},
    "scores": {suite: {"overall", "ci95", "n"}}} of one registered version."""
    import mlflow.artifacts

    client = client or tracking.client()
    mv = resolve(uri, client)
    run_id = mv.tags.get("unitoken.registration_run", mv.run_id)
    tmp = Path(tempfile.mkdtemp(prefix="unitoken-diff-"))
    try:
        evidence = Path(with_artifact_retries(
            f"evidence of run {run_id}", lambda: mlflow.artifacts.download_artifacts(
                tracking_uri=default_tracking_uri(), run_id=run_id, artifact_path="", dst_path=str(tmp)),
            action="reading it from"))
        passport = json.loads((evidence / "passport.json").read_text())
        report = json.loads((evidence / "eval" / "report.json").read_text())
    except (ArtifactLogError, OSError, ValueError) as err:
        raise RegistryError(f"{uri}: its passport or evaluation report cannot be read ({err})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    build = next((e for e in passport if e["kind"] == "build"), {})
    stages = {}
    for e in passport:
        if e["kind"] == "stage":
            facts = _stage_params(client, e.get("mlflow_run_id"))
            if e.get("mixture"):  # the passport carries it (versions registered before: the run's params)
                facts["mixture"] = {r["source"]: {k: v for k, v in r.items() if k != "source"} for r in e["mixture"]}
            stages[int(e["stage"])] = {"run": e.get("mlflow_run_id"), **facts}
    scores = {suite: {"overall": s.get("overall"), "ci95": s.get("ci95"), "n": s.get("n")}
              for suite, s in report.get("suites", {}).items()}
    return {"uri": uri, "name": mv.name, "version": str(mv.version), "commit": build.get("git_commit"),
            "package_version": build.get("package_version"), "stages": stages, "scores": scores}


def _stage_params(client, run_id: str | None) -> dict:
    """The stage run's mixture ({source: {field: value}}) and recipe params; empty where the run
    is not on this server."""
    if not run_id:
        return {"mixture": {}, "recipe": {}}
    try:
        params = client.get_run(run_id).data.params
    except Exception:  # noqa: BLE001 - a stage tracked elsewhere: nothing to compare, said by the empty mixture
        return {"mixture": {}, "recipe": {}}
    mixture: dict[str, dict] = {}
    for key, value in params.items():
        if key.startswith("mixture."):
            source, _, field = key[len("mixture."):].rpartition(".")
            mixture.setdefault(source, {})[field] = _number(value)
    recipe = {k: v for k, v in params.items() if k.startswith(RECIPE_PREFIXES)}
    return {"mixture": mixture, "recipe": recipe}


def _number(value: str):
    try:
        f = float(value)
    except ValueError:
        return value
    return int(f) if f.is_integer() else f


def diff_versions(a: str, b: str, client=None) -> dict:
    """What differs between versions ``a`` and ``b`` (each ``version_facts``): per stage the mixture
    and the recipe fields, the commit, and the scores of both."""
    client = client or tracking.client()
    fa, fb = version_facts(a, client), version_facts(b, client)
    stages = {}
    for n in sorted(set(fa["stages"]) | set(fb["stages"])):
        sa, sb = fa["stages"].get(n, {}), fb["stages"].get(n, {})
        ma, mb = sa.get("mixture", {}), sb.get("mixture", {})
        own = f"train.stage{n}."
        stages[n] = {"runs": {"a": sa.get("run"), "b": sb.get("run")},
                     "mixture": _changed(ma, mb), "sources": {"a": sorted(ma), "b": sorted(mb)},
                     "recipe": _changed(*({k: v for k, v in s_.get("recipe", {}).items() if k.startswith(own)}
                                          for s_ in (sa, sb)))}
    last = {k: (f["stages"][max(f["stages"])] if f["stages"] else {}).get("recipe", {}) for k, f in (("a", fa), ("b", fb))}
    shared = _changed(*({k: v for k, v in last[x].items() if not k.startswith("train.stage")} for x in ("a", "b")))
    scores = _changed(fa["scores"], fb["scores"], keep_equal=True)
    return {"a": _head(fa), "b": _head(fb), "commit_changed": fa["commit"] != fb["commit"], "recipe": shared,
            "stages": stages, "scores": scores}


def _changed(a: dict, b: dict, keep_equal: bool = False) -> dict:
    """{key: {"a": value or None, "b": value or None}} for the keys whose values differ (all with ``keep_equal``)."""
    return {k: {"a": a.get(k), "b": b.get(k)} for k in sorted(set(a) | set(b)) if keep_equal or a.get(k) != b.get(k)}


def _head(facts: dict) -> dict:
    return {k: facts[k] for k in ("uri", "name", "version", "commit", "package_version")}
