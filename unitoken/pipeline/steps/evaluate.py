"""Evaluation and the gate: the candidate's scores (and held-out losses), then the candidate
against the registered champion evaluated now on the same items."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from unitoken.model.devices import pick_device
from unitoken.pipeline.cache import StepCache, dataset_digest, model_digest
from unitoken.pipeline.steps.data import data_root
from unitoken.pipeline.steps.runs import cached_step, step_run
from unitoken.pipeline.steps.train import tokens_digest
from unitoken.recipes import get_recipe, sampling_defaults
from unitoken.registry import load_uri
from unitoken.tracking import store as tracking

log = logging.getLogger(__name__)


def evaluate(model_dir: Path, dataset: Path, suites: str, limit: int, out: Path, parent_run_id: str | None,
             label: str, cfg_scale: float | None = None, top_k: int | None = None, seed: int = 0,
             cache: StepCache | None = None, tokens: Path | None = None, heldout_limit: int = 500,
             temperature: float = 1.0, batch_size: int = 64) -> dict:
    """Run the evaluation suites, and with ``tokens`` (the pre-tokenised data) the held-out loss
    per task on its test split; metrics go to a nested run named ``eval-<label>``, the losses as
    ``heldout_loss/<task>`` (cached: ``cached_step``; a hit logs the cached metrics on its run, so
    scores read the same). ``cfg_scale`` / ``top_k`` left at None take the model's recipe's;
    ``temperature`` is the image sampling temperature, ``batch_size`` items per forward pass."""
    from unitoken.eval.runner import evaluate as run_eval

    sampling, _ = sampling_defaults(model_dir)
    cfg_scale = sampling.cfg if cfg_scale is None else cfg_scale
    top_k = sampling.top_k if top_k is None else top_k
    device = pick_device()
    names = [s.strip() for s in suites.split(",") if s.strip()]
    def inputs():
        held = {"tokens_sha256": tokens_digest(tokens), "heldout_limit": heldout_limit} if tokens else {}
        return {"model_sha256": model_digest(model_dir), "data_sha256": dataset_digest(dataset), "suites": names,
                "limit": limit, "cfg_scale": cfg_scale, "top_k": top_k, "temperature": temperature,
                "batch_size": batch_size, "seed": seed, "device": device, **held}

    def compute(tags):
        with step_run(f"eval-{label}", parent_run_id, {"suites": suites, "limit": limit, "model": label}) as run:
            run.tags(tags)
            report = run_eval(model_dir, names, out, data=data_root(dataset), limit=limit or None,
                              cfg_scale=cfg_scale, top_k=top_k, temperature=temperature, seed=seed, device=device,
                              batch_size=batch_size, heldout_tokens=tokens, heldout_limit=heldout_limit)
            run.metrics(eval_metrics(report))
            for name in ("report.json", "report.html"):
                run.artifact(Path(out) / name, f"eval-{label}")
        return {k: v for k, v in eval_metrics(report).items() if k.endswith("/overall") or
                k.startswith("heldout_loss/")}, run.run_id

    def hit_metrics(out_dir: Path) -> dict:
        return eval_metrics(json.loads((out_dir / "report.json").read_text()))

    return cached_step("evaluate", f"eval-{label}", inputs, out, cache, parent_run_id, compute, hit_metrics)


def eval_metrics(report: dict) -> dict:
    """An evaluation's scores, each suite's chance level and 95 % interval (``<suite>/chance``,
    ``<suite>/ci95_low``, ``<suite>/ci95_high``), plus its held-out losses (``heldout_loss/<task>``
    and per source ``heldout_loss/<task>/<source>``; lower is better). Only the scores are in
    ``report["metrics"]``, which the gate reads. A task's mean loss mixes its sources:
    understanding's is mostly captions and dialogues, whose answers are long and free, over
    short VQA answers (the small study's run 6: 6-14 nats per token against 0.13-0.18), so each
    source is logged on its own too."""
    extra = {}
    for suite, v in (report.get("suites") or {}).items():
        extra[f"{suite}/chance"] = v["chance"]
        if v.get("ci95"):
            extra[f"{suite}/ci95_low"], extra[f"{suite}/ci95_high"] = v["ci95"]
    for task, v in (report.get("heldout") or {}).items():
        if isinstance(v, dict):
            extra[f"heldout_loss/{task}"] = v["mean"]
            extra |= {f"heldout_loss/{task}/{src}": x for src, x in v.get("categories", {}).items()}
    return report["metrics"] | extra


def gate(candidate_eval: Path, dataset: Path, model_name: str, policy_yaml: str, out: Path, parent_run_id: str,
         recipe: str = "", overrides: list[str] | None = None) -> dict:
    """Gate the candidate against the registered champion (evaluated now, on the same items and
    settings, from ``dataset``: paths recorded by another pod do not exist in this one), or
    against the policy's floors alone when ``model_name`` has no champion. The policy is
    ``policy_yaml`` when given, else the default with ``recipe``'s floors (``Recipe.gate``)."""
    from unitoken.eval.gate import GatePolicy, decide, write_decision
    from unitoken.eval.runner import evaluate_like

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if policy_yaml.strip():
        policy_file = out / "policy.yaml"
        policy_file.write_text(policy_yaml)
        policy, source = GatePolicy.from_yaml(policy_file), "the pipeline's gate_policy parameter"
    elif recipe:
        policy, source = GatePolicy.from_recipe(get_recipe(recipe, overrides).gate), f"recipe {recipe}"
    else:
        policy, source = GatePolicy(), "the default policy"
    champion_version, champion_eval = _champion(model_name), None
    if champion_version is not None:
        champion_eval = out / "champion-eval"
        evaluate_like(candidate_eval, load_uri(f"models:/{model_name}/{champion_version}"), champion_eval,
                      data=data_root(dataset), device=pick_device())
    with step_run("gate", parent_run_id, {"champion_version": champion_version or "none"}) as run:
        decision = decide(candidate_eval, champion_eval, policy)
        decision["champion_version"] = champion_version or "none"
        decision["policy_source"] = source
        write_decision(decision, out / "decision.json")
        run.metrics({"passed": float(decision["passed"])})
        run.tags({"unitoken.gate_checks": gate_summary(decision)[:5000]})
        run.artifact(out / "decision.json", "gate")
    return {"passed": bool(decision["passed"]), "champion_version": champion_version or "none",
            "reasons": decision.get("reasons", [])}


def gate_summary(decision: dict) -> str:
    """The decision in a few lines: its policy, then PASS/FAIL and the reason of every check."""
    lines = [f"policy: {decision.get('policy_source', 'unknown')}"]
    lines += [f"{'PASS' if c['passed'] else 'FAIL'} {c['reason']}" for c in decision["checks"]]
    return "\n".join(lines)


def _champion(model_name: str) -> str | None:
    client = tracking.client()
    try:
        aliases = client.get_registered_model(model_name).aliases
    except Exception as err:  # noqa: BLE001 - a name never registered has no champion
        if "RESOURCE_DOES_NOT_EXIST" in str(err) or "not found" in str(err).lower():
            return None
        raise
    return str(aliases["champion"]) if "champion" in aliases else None
