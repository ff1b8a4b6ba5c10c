"""``unitoken eval``: run suites, keep per-item results, write JSON + HTML reports.

``OUT/report.json``   {"model", "suites": {name: {"task", "overall", "ci95", "categories", "n", "chance"}},
                       "metrics": {"shapes-vqa/overall": ..., "shapes-vqa/color": ...}}
``OUT/items.jsonl``   one line per item: {suite, task, id, category, score, ...} (paired statistics)
``OUT/report.html``   per-category bar charts and a grid of generated images with prompts and verdicts
"""

from __future__ import annotations

import base64
import io
import json
from contextlib import nullcontext
from pathlib import Path

from unitoken.eval.summary import summarize
from unitoken.files import sha256_file

SUITES = {
    "shapes-vqa": "understanding",
    "shapes-geneval": "generation",
    "mc": "understanding",
    "geneval": "generation",
}


def evaluate(model_path: str | Path, suites: list[str], out: str | Path, data: Path | None = None,
             limit: int | None = None, mc_file: Path | None = None, circular: bool = False,
             geneval_metadata: Path | None = None, detector: str | None = None, cfg_scale: float | None = None,
             top_k: int | None = None, seed: int = 0, device: str = "cpu", progress_factory=None,
             temperature: float = 1.0, batch_size: int = 64, heldout_tokens: Path | None = None,
             heldout_limit: int | None = 500) -> dict:
    """Run ``suites`` on the model; with ``heldout_tokens`` (a pre-tokenised dir) also the
    held-out loss per task on its test split (``report["heldout"]``, ``heldout.jsonl``). The loss
    stays out of ``metrics`` and ``items.jsonl``: the gate reads those as higher-is-better scores.
    ``cfg_scale`` / ``top_k`` left at None take the model's recipe's (``sampling_defaults``)."""
    from unitoken.eval import generation as gen
    from unitoken.eval import understanding as und
    from unitoken.model.io import load_model
    from unitoken.model.sequence import SequenceBuilder
    from unitoken.recipes import sampling_defaults

    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ValueError(f"--suite {','.join(unknown)}: unknown; use {', '.join(SUITES)}")
    if any(s.startswith("shapes-") for s in suites) and data is None:
        raise ValueError("the shapes suites need --data (a directory made by `unitoken data synth`)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_path = Path(model_path)
    sampling, _ = sampling_defaults(model_path)
    cfg_scale = sampling.cfg if cfg_scale is None else cfg_scale
    top_k = sampling.top_k if top_k is None else top_k
    model, tokenizer = load_model(model_path, device=device)
    builder = SequenceBuilder(model.tokens, tokenizer, model.config)
    if heldout_tokens is not None:  # a mismatched or empty dir fails before the suites run
        from unitoken.eval.heldout import heldout_dataset, heldout_loss, summarize_loss

        heldout_data = heldout_dataset(heldout_tokens, builder)
    all_items, summary = [], {}
    for suite in suites:
        bar, update = progress_factory(suite) if progress_factory else (None, None)
        if suite in ("shapes-vqa", "mc"):
            items = und.shapes_vqa_items(data, limit) if suite == "shapes-vqa" else \
                und.mc_file_items(_need(mc_file, "--mc-file"), circular, limit)
            with bar or nullcontext():
                results = und.run_understanding(model, builder, items, batch_size=batch_size, progress=update)
            chance = und.chance_level(items)
        else:
            items = gen.shapes_geneval_items(data, limit) if suite == "shapes-geneval" else \
                gen.geneval_items(_need(geneval_metadata, "--geneval-metadata"), limit)
            det = gen.load_detector(detector)
            with bar or nullcontext():
                results = gen.run_generation(model, builder, items, out, det, cfg_scale=cfg_scale, top_k=top_k,
                                             temperature=temperature, seed=seed, batch_size=batch_size,
                                             progress=update)
            chance = gen.random_code_baseline(model, items, det, seed)
        for r in results:
            all_items.append({"suite": suite, "task": SUITES[suite], **r})
        summary[suite] = summarize(results, SUITES[suite], chance)
    metrics = {f"{s}/overall": v["overall"] for s, v in summary.items()}
    metrics.update({f"{s}/{c}": x for s, v in summary.items() for c, x in v["categories"].items()})
    weights = Path(model_path) / "model.safetensors"
    report = {"model": str(Path(model_path).resolve()), "suites": summary, "metrics": metrics,
              "model_sha256": sha256_file(weights) if weights.is_file() else None,
              "settings": {"limit": limit, "cfg_scale": cfg_scale, "top_k": top_k, "temperature": temperature,
                           "seed": seed, "data": str(data)}}
    if heldout_tokens is not None:
        bar, update = progress_factory("held-out loss") if progress_factory else (None, None)
        with bar or nullcontext():
            losses = heldout_loss(model, builder, heldout_data, limit=heldout_limit, batch_size=batch_size,
                                  progress=update)
        (out / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in losses))
        report["heldout"] = {"tokens": str(heldout_tokens), "split": "test", **summarize_loss(losses)}
    (out / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in all_items))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.html").write_text(render_html(report, all_items, out))
    return report


def _need(value, flag):
    if value is None:
        raise ValueError(f"this suite needs {flag}")
    return value


def evaluate_like(candidate_eval: str | Path, model_path: str | Path, out: str | Path, data: Path | None = None,
                  device: str = "cpu") -> dict:
    """Evaluate ``model_path`` (the champion) exactly as ``candidate_eval`` was evaluated: the same
    suites, items (limit, data) and sampling settings, so the gate's comparison is paired.
    ``data`` overrides the recorded data dir (another pod sees the data at another path)."""
    report, _ = load_eval(candidate_eval)
    st = report["settings"]
    if data is None and st.get("data") not in (None, "None"):
        data = Path(st["data"])
    return evaluate(model_path, list(report["suites"]), out, data=data, limit=st["limit"], cfg_scale=st["cfg_scale"],
                    top_k=st["top_k"], temperature=st.get("temperature", 1.0), seed=st["seed"], device=device)


def load_eval(path: str | Path) -> tuple[dict, list[dict]]:
    path = Path(path)
    if not (path / "report.json").is_file() or not (path / "items.jsonl").is_file():
        raise FileNotFoundError(f"{path}: not an evaluation directory (report.json + items.jsonl); run `unitoken eval`")
    report = json.loads((path / "report.json").read_text())
    items = [json.loads(x) for x in (path / "items.jsonl").read_text().splitlines() if x.strip()]
    return report, items


def _chart(summary: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(5 * len(summary), 3.2), dpi=100, squeeze=False)
    for ax, (suite, s) in zip(axes[0], summary.items()):
        names = list(s["categories"])
        ax.bar(names, [s["categories"][n] for n in names], color="#4C72B0")
        ax.axhline(s["chance"], color="#C44E52", ls="--", lw=1, label=f"chance {s['chance']:.2f}")
        ax.set_ylim(0, 1)
        ax.set_title(f"{suite}: {s['overall']:.3f} (n={s['n']})")
        ax.tick_params(axis="x", rotation=35, labelsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _ci(suite: dict) -> str:
    lo, hi = suite.get("ci95") or (None, None)  # reports written before the interval existed have none
    return "-" if lo is None else f"[{lo:.3f}, {hi:.3f}]"


def render_html(report: dict, items: list[dict], out: Path) -> str:
    """report.html: scores per suite with a chart per category, the held-out losses, the
    generated images with their verdicts and the answers (``templates/evaluation.html.j2``)."""
    from unitoken.reports import render

    chart = _chart(report["suites"]) if report["suites"] else ""
    return render("evaluation.html.j2", report=report, items=items, chart=chart, heldout=report.get("heldout") or {},
                  ci=_ci)
