"""Tables, the per-stage plot and a grid of generated images of a `studies/small_study/run.sh` run.

    python -m studies.small_study.report DIR      # DIR: results*.json and raw_main.tar.gz from the run
    python -m studies.small_study.report --compare OUT.png RUN_DIR RUN_DIR ...   # runs side by side
    python -m studies.small_study.report --target OUT.json RUN_DIR COMMIT GPU_SECONDS   # the target run's summary

Writes ``scores_per_stage.png`` and ``stage3_generations.png`` into DIR and prints the Markdown
tables that docs/results.md quotes (every number comes from the JSON files).
"""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

from studies.small_study import stats


def fmt(e: dict | None, suite: str) -> str:
    if not e or suite not in e or "overall" not in e[suite]:
        return "-"
    s = e[suite]
    return f"{s['overall']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"


def loss(e: dict | None, task: str) -> float | None:
    """Held-out loss of a task (``stats.heldout_summary``); None where not measured."""
    return e["heldout"][task]["mean"] if e and task in e.get("heldout", {}) else None


def loss_delta(doc: dict, enc: str, task: str) -> str:
    """" (change [95 % CI])" of the held-out loss, joint run minus single-task run, paired on
    the same records (from the raw per-record files); the plain difference without them."""
    single = single_run(doc, enc, task)
    change = paired_change(doc, f"abl_{enc}_both", single, task)
    if change is not None:
        return f" ({_ci(change)})"
    return _delta(loss(doc["evals"].get(f"abl_{enc}_both"), task), loss(doc["evals"].get(single), task))


def single_run(doc: dict, enc: str, task: str) -> str:
    """The single-task run a joint run is set against: since run 6 the dual encoding has no
    generation-only run of its own, it is the discrete one's experiment (Table 5's row 5)."""
    kind = "und" if task in ("understanding", "shapes-vqa") else "gen"
    if enc == "dual" and kind == "gen" and "abl_dual_gen" not in doc["evals"]:
        return "abl_disc_gen"
    return f"abl_{enc}_{kind}"


def paired_change(doc: dict, joint: str, single: str, measure: str) -> dict | None:
    """joint - single per item ({"diff", "ci95", "n", "by_item"}), None without per-item files."""
    a, b = per_item(doc, single, measure), per_item(doc, joint, measure)
    by_item = {i: b[i] - a[i] for i in set(a) & set(b)}
    if not by_item:
        return None
    return stats.paired_diff({i: 0.0 for i in by_item}, by_item) | {"by_item": by_item}


def fmt_loss(e: dict | None, task: str) -> str:
    if loss(e, task) is None:
        return "-"
    s = e["heldout"][task]
    return f"{s['mean']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"


def score(e: dict | None, suite: str) -> float | None:
    return e[suite]["overall"] if e and suite in e and "overall" in e[suite] else None


def plot(doc: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [("stage1", "stage 1"), ("stage2", "stage 2"), ("stage3", "stage 3")]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for suite, color in (("shapes-vqa", "#4C72B0"), ("shapes-geneval", "#DD8452")):
        xs, ys, lo, hi = [], [], [], []
        for i, (key, _) in enumerate(stages):
            e = doc["evals"].get(key)
            if score(e, suite) is None:
                continue
            xs.append(i)
            ys.append(e[suite]["overall"])
            lo.append(e[suite]["overall"] - e[suite]["ci95"][0])
            hi.append(e[suite]["ci95"][1] - e[suite]["overall"])
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, color=color, label=suite)
        chance = next((doc["evals"][k][suite]["chance"] for k, _ in stages
                       if score(doc["evals"].get(k), suite) is not None), None)
        if chance is not None:
            ax.axhline(chance, color=color, ls=":", lw=1)
    tuned = doc["evals"].get("stage3_tuned")
    if score(tuned, "shapes-geneval") is not None:
        ax.plot([2], [tuned["shapes-geneval"]["overall"]], marker="*", ms=11, color="#C44E52", ls="",
                label="stage 3 GenEval, sampling chosen on val")
    ax.set_xticks(range(len(stages)), [s for _, s in stages])
    _finish(fig, ax, png, "small recipe: scores after each stage", "score (95 % CI); dotted: chance",
            fontsize=7, loc="upper left")


def ablation_plot(doc: dict, png: Path) -> None:
    """Table 5/6 scores per run, and joint training's paired changes per encoding (interference:
    a score falls / a loss rises)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = doc["evals"]
    names = [k for k in ("disc_und", "disc_gen", "disc_both", "dual_und", "dual_gen", "dual_both", "dual_u2g1",
                         "dual_u1g2") if f"abl_{k}" in ev]
    changes = joint_changes(doc)
    fig, axes = plt.subplots(1, 2 if changes else 1, figsize=(12 if changes else 7, 3.8), dpi=110, squeeze=False)
    ax = axes[0][0]
    for j, (suite, color) in enumerate((("shapes-vqa", "#4C72B0"), ("shapes-geneval", "#DD8452"))):
        label = suite  # on the suite's first bar only
        for i, name in enumerate(names):
            e = ev[f"abl_{name}"]
            if score(e, suite) is not None:
                v, (lo, hi) = e[suite]["overall"], e[suite]["ci95"]
                ax.bar(i + (j - 0.5) * 0.38, v, 0.38, yerr=[[v - lo], [hi - v]], capsize=2, color=color, label=label)
                label = None
    ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=7)
    _finish(fig, ax, None, "ablation runs (stage 2 only)", "score (95 % CI)", fontsize=7)
    if changes:
        ax = axes[0][1]
        for k, (enc, color) in enumerate((("discrete only", "#8172B3"), ("dual", "#55A868"))):
            vals = [c[1 + k] for c in changes]
            ax.bar([i + (k - 0.5) * 0.38 for i in range(len(changes))], [v["diff"] for v in vals], 0.38,
                   yerr=[[v["diff"] - v["ci95"][0] for v in vals], [v["ci95"][1] - v["diff"] for v in vals]],
                   capsize=2, color=color, label=enc)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(changes)), [c[0].replace(", ", "\n") for c in changes], fontsize=7)
        ax.set_title("joint minus single-task run (paired 95 % CI)\nscores: + better; losses: - better")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def _finish(fig, ax, png: Path | None, title: str, ylabel: str, **legend) -> None:
    import matplotlib.pyplot as plt

    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(**legend)
    if png is not None:  # else the caller adds panels and saves
        fig.tight_layout()
        fig.savefig(png)
        plt.close(fig)


def tables(doc: dict) -> str:
    ev = doc["evals"]
    out = []
    for key, name in (("stage1", "after stage 1"), ("stage2", "after stage 2"), ("stage3", "after stage 3"),
                      ("stage3_tuned", "after stage 3, sampling chosen on val")):
        e = ev.get(key)
        if not e:
            continue
        out.append(f"| {name} | {fmt(e, 'shapes-vqa')} | {_chance(e, 'shapes-vqa')} | {fmt(e, 'shapes-geneval')} | "
                   f"{_chance(e, 'shapes-geneval')} | {fmt_loss(e, 'understanding')} | {fmt_loss(e, 'generation')} |")
    if out:  # the main chain's evaluations (an ablation-only study has none)
        out[:0] = ["| model | shapes-VQA (95 % CI) | VQA chance | shapes-GenEval (95 % CI) | GenEval chance | "
                   "held-out loss, und | held-out loss, gen |", "|---|---|---|---|---|---|---|"]
        out += ["", "(held-out loss: mean NLL per supervised token of test records of stage 2's sources)"]
    abl = doc.get("results_ablation.json", {})
    if "unit_steps" in abl:
        batch = abl.get("abl_batch") or "the recipe's"
        out += ["", f"Ablation unit u = {abl['unit_steps']} steps of {batch} samples: single-task runs u steps, "
                    "joint and Table 6 runs 2u."]
    out += ["", "Table 5 style (stage 2 only; single-task runs see as many samples of their task as the joint run;",
            "held-out loss: mean NLL per supervised token of test records of stage 2's sources (VQA; text-to-image),",
            "lower is better; in brackets after a joint run: its change against the single-task run of the same",
            "encoding, paired on the same records where the per-record files are there):", "",
            "| # | encoding | stage-2 data | shapes-VQA | shapes-GenEval | held-out loss, und | held-out loss, gen |",
            "|---|---|---|---|---|---|---|"]
    n = 0
    for enc, label in (("disc", "discrete only"), ("dual", "dual (UniToken)")):
        und, gen = (ev.get(single_run(doc, enc, t)) for t in ("understanding", "generation"))
        both = ev.get(f"abl_{enc}_both")
        shared = single_run(doc, enc, "generation") != f"abl_{enc}_gen"
        for data, e in (("understanding only", und), ("generation only", gen), ("both", both)):
            n += 1
            v, g = fmt(e, "shapes-vqa"), fmt(e, "shapes-geneval")
            lu, lg = fmt_loss(e, "understanding"), fmt_loss(e, "generation")
            if data == "generation only" and shared:
                data += " (row 2's run: the same experiment)"
            if data == "both":
                v += _delta(score(e, "shapes-vqa"), score(und, "shapes-vqa"))
                g += _delta(score(e, "shapes-geneval"), score(gen, "shapes-geneval"))
                lu += loss_delta(doc, enc, "understanding")
                lg += loss_delta(doc, enc, "generation")
            out.append(f"| {n} | {label} | {data} | {v} | {g} | {lu} | {lg} |")
    out += interference(doc)
    out += ["", "Table 6 style (dual, stage 2, understanding:generation data ratio, same steps as the 1:1 run):",
            "", "| und:gen | shapes-VQA | shapes-GenEval | held-out loss, und | held-out loss, gen |",
            "|---|---|---|---|---|"]
    for key, ratio in (("abl_dual_both", "1:1"), ("abl_dual_u2g1", "2:1"), ("abl_dual_u1g2", "1:2")):
        e = ev.get(key)
        out.append(f"| {ratio} | {fmt(e, 'shapes-vqa')} | {fmt(e, 'shapes-geneval')} | "
                   f"{fmt_loss(e, 'understanding')} | {fmt_loss(e, 'generation')} |")
    runs = doc["runs"]
    if runs or doc.get("partial_seconds"):
        out += ["", "| training run | steps | seconds | s/step | final loss |", "|---|---|---|---|---|"]
        for key, r in runs.items():
            out.append(f"| {key} | {r['steps']} | {r['seconds']} | {r['step_s']} | {r['final_loss']} |")
    for key, seconds in doc.get("partial_seconds", {}).items():
        if key not in runs:  # cut off by the study's end: the time it had and how far it got
            done, planned = doc["partial_steps"].get(key, ("-", "-"))
            out.append(f"| {key} (unfinished) | {done} of {planned} | {seconds} | - | - |")
    stages = doc.get("results_main.json", {}).get("plan", {}).get("stages", {})
    if "replanned" in stages:  # study.py Chain.fit_stages
        r = stages["replanned"]
        longer = stages["s2_steps"] > r["from"]["s2_steps"]
        out += ["", f"Stages 2 + 3 were {'lengthened' if longer else 'shortened'} from {r['from']['s2_steps']} + "
                    f"{r['from']['s3_steps']} to {stages['s2_steps']} + {stages['s3_steps']} steps when stage 2, at "
                    f"step {r['at_step']} ({r['step_s']} s/step with the margin), "
                    + ("had time to spare." if longer else "could not finish in the time left.")]
    return "\n".join(out)


def per_item(doc: dict, name: str, measure: str) -> dict[str, float]:
    """{item id: value} of one evaluation: a suite's scores, or a task's held-out losses on stage
    2's sources (empty without the raw per-item files)."""
    if measure.startswith("shapes-"):
        return doc.get("items", {}).get(name, {}).get(measure, {})
    return {r["id"]: r["score"] for r in stats.stage2_records(doc.get("heldout_records", {}).get(name, []))
            if r["task"] == measure}


def joint_changes(doc: dict) -> list[tuple[str, dict, dict, dict]]:
    """What joint training changed per encoding, and dual minus discrete-only in that change, each
    paired on the same items (the paper's claim: dual encoding suffers less interference):
    [(measure, discrete's change, dual's, dual minus discrete)]. The generation-only run is shared
    by both encodings (Table 5's row 5)."""
    measures = (("shapes-VQA", "shapes-vqa"), ("shapes-GenEval", "shapes-geneval"),
                ("held-out loss, und", "understanding"), ("held-out loss, gen", "generation"))
    out = []
    for label, measure in measures:
        d, u = (paired_change(doc, f"abl_{enc}_both", single_run(doc, enc, measure), measure)
                for enc in ("disc", "dual"))
        if d is not None and u is not None:
            out.append((label, d, u, stats.paired_diff(d["by_item"], u["by_item"])))
    return out


def interference(doc: dict) -> list[str]:
    rows = [f"| {label} | {_ci(d)} | {_ci(u)} | {_ci(x)} | {x['n']} |" for label, d, u, x in joint_changes(doc)]
    if not rows:
        return []
    return ["", "Joint training's change against the single-task run, per encoding, and dual minus discrete-only",
            "in that change (paired on the same items; for a score + is better, for a loss - is; interference",
            "shows as a drop in score / a rise in loss, and the paper's claim as dual minus discrete > 0 in",
            "score / < 0 in loss):", "",
            "| measure | discrete only | dual | dual minus discrete | items |", "|---|---|---|---|---|", *rows]


def _ci(d: dict) -> str:
    return f"{d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"


def _chance(e: dict, suite: str) -> str:
    return f"{e[suite]['chance']:.3f}" if suite in e and "chance" in e[suite] else "-"


def _delta(a: float | None, b: float | None) -> str:
    return "" if a is None or b is None else f" ({a - b:+.3f})"


def load(folder: Path) -> dict:
    """results.json (setup) + results_main.json + results_ablation.json, evals and runs merged;
    with the raw archives, every evaluation's per-record held-out losses (``heldout_records``),
    its held-out summary recomputed from them (run 6's JSON has the mean over all sources)."""
    doc = {"evals": {}, "runs": {}, "partial_seconds": {}, "partial_steps": {}, "heldout_records": {}, "items": {}}
    for name in ("results.json", "results_main.json", "results_ablation.json"):
        path = folder / name
        if path.is_file():
            part = json.loads(path.read_text())
            for key in ("evals", "runs", "partial_seconds", "partial_steps"):
                doc[key].update(part.pop(key, {}))
            doc[name] = part
    for raw in sorted(folder.glob("raw_*.tar.gz")):
        with tarfile.open(raw) as tar:
            for member in tar.getmembers():
                parts = member.name.split("/")  # evals/NAME/SUITE/{heldout,items}.jsonl
                # only recorded evaluations: one cut off at a deadline may have left a partial file
                if len(parts) != 4 or parts[0] != "evals" or parts[1] not in doc["evals"] or \
                        parts[3] not in ("heldout.jsonl", "items.jsonl"):
                    continue
                rows = [json.loads(x) for x in tar.extractfile(member).read().decode().splitlines() if x.strip()]
                if parts[3] == "heldout.jsonl":
                    doc["heldout_records"][parts[1]] = rows
                    doc["evals"][parts[1]]["heldout"] = stats.heldout_summary(rows)
                else:
                    doc["items"].setdefault(parts[1], {})[parts[2]] = {r["id"]: r["score"] for r in rows}
    return doc


def grid_png(raw: Path, name: str, png: Path, n: int = 28) -> None:
    """Generated images of one evaluation (from raw.tar.gz) with their prompts and verdicts."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    base = f"evals/{name}/shapes-geneval"
    with tarfile.open(raw) as tar:
        rows = [json.loads(x) for x in tar.extractfile(f"{base}/items.jsonl").read().decode().splitlines()]
        names = set(tar.getnames())
        rows = [r for r in rows if f"{base}/{r['image']}" in names]
        if not rows:  # the archive kept no images of this evaluation (run 6's ablation predates them)
            return
        by_cat: dict[str, list[dict]] = {}
        for r in rows:
            by_cat.setdefault(r["category"], []).append(r)
        picked = [r for k in range(n) for rs in by_cat.values() if k < len(rs) for r in [rs[k]]][:n]
        cols, n_rows = 7, max(1, (len(picked) + 6) // 7)
        fig, axes = plt.subplots(n_rows, cols, figsize=(cols * 2.1, 2.5 * n_rows), dpi=90, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, r in zip(axes.flat, picked):
            ax.imshow(Image.open(io.BytesIO(tar.extractfile(f"{base}/{r['image']}").read())))
            ax.set_title(("PASS " if r["score"] else "fail ") + r["prompt"][:38], fontsize=6,
                         color="green" if r["score"] else "red", wrap=True)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def compare(folders: list[Path], png: Path) -> None:
    """Scores after each stage, runs side by side (the legend gives each run's stage steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    styles = {"shapes-vqa": ("#4C72B0", 0.95), "shapes-geneval": ("#DD8452", 0.80)}
    stages = ("stage1", "stage2", "stage3")
    for k, folder in enumerate(folders):
        doc = load(folder)
        steps = "+".join(str(doc["runs"][r]["steps"]) for r in ("s1", "s2", "s3") if r in doc["runs"])
        shift = (k - (len(folders) - 1) / 2) * 0.08
        for suite, (color, target) in styles.items():
            pts = [(i + shift, doc["evals"][key][suite]) for i, key in enumerate(stages)
                   if score(doc["evals"].get(key), suite) is not None]
            if not pts:
                continue
            ax.errorbar([x for x, _ in pts], [e["overall"] for _, e in pts],
                        yerr=[[e["overall"] - e["ci95"][0] for _, e in pts],
                              [e["ci95"][1] - e["overall"] for _, e in pts]],
                        marker="os^"[k % 3], capsize=3, color=color, alpha=0.4 + 0.6 * (k + 1) / len(folders),
                        label=f"{folder.name} ({steps} steps) {suite}")
            if k == 0:
                ax.axhline(target, color=color, ls="--", lw=1)
    ax.set_xticks(range(3), ["after stage 1", "after stage 2", "after stage 3"])
    _finish(fig, ax, png, "small recipe, run by run; dashed: the issue's targets", "score (95 % CI)",
            fontsize=6.5, loc="center left")


def target(folder: Path, out: Path, commit: str, gpu_seconds: float) -> dict:
    """The issue's summary of a target run: stage 3's scores from the raw files, with the commit the
    run was made at and the device time it held (machine start included; the raw files cannot know
    either, so both are given)."""
    stage3 = load(folder)["evals"]["stage3"]
    pick = {"vqa": "shapes-vqa", "geneval": "shapes-geneval"}
    summary = {"run": folder.name, "commit": commit, "gpu_seconds": gpu_seconds,
               **{key: {f: stage3[suite][f] for f in ("overall", "ci95", "n")} for key, suite in pick.items()}}
    out.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main() -> None:
    if sys.argv[1] == "--target":  # --target OUT.json DIR COMMIT GPU_SECONDS
        print(target(Path(sys.argv[3]), Path(sys.argv[2]), sys.argv[4], float(sys.argv[5])))
        return
    if sys.argv[1] == "--compare":  # --compare OUT.png DIR DIR ...
        compare([Path(p) for p in sys.argv[3:]], Path(sys.argv[2]))
        return
    folder = Path(sys.argv[1])
    doc = load(folder)
    if any(k.startswith("stage") for k in doc["evals"]):
        plot(doc, folder / "scores_per_stage.png")
    if any(k.startswith("abl_") for k in doc["evals"]):
        ablation_plot(doc, folder / "ablation.png")
    for raw, name in (("raw_main", "stage3_tuned"), ("raw_main", "stage3"), ("raw_ablation", "abl_disc_both"),
                      ("raw_ablation", "abl_dual_both")):
        raw = folder / f"{raw}.tar.gz"
        if raw.is_file() and name in doc["evals"]:
            grid_png(raw, name, folder / f"{name}_generations.png")
    print(tables(doc))


if __name__ == "__main__":
    main()
