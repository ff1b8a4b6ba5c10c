"""Headline numbers of the GPU benchmarks against issue 8's targets, and the plot of the note.

    python bench/perf_summary.py runs/bench                                  # table (last thing make bench-gpu prints)
    python bench/perf_summary.py docs/results/performance --plot docs/performance.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table


def _load(d: Path, name: str) -> dict | None:
    p = d / name
    return json.loads(p.read_text()) if p.is_file() else None


def _variant(doc: dict | None, name: str) -> dict:
    if not doc:
        return {}
    return next((v for v in doc["variants"] if v.get("variant") == name), {})


def seven_b_variants(d: Path) -> list[dict]:
    """Every 7B-shape variant; those from a separate process are named with their file's row length."""
    main = _load(d, "throughput_7b.json")
    rows = [dict(v, source="throughput_7b.json") for v in (main or {}).get("variants", []) if "mfu" in v]
    for p in sorted(d.glob("throughput_7b_*.json")):
        doc = json.loads(p.read_text())
        for v in doc["variants"]:
            if "mfu" in v:
                rows.append(dict(v, variant=f"{v['variant']} ({doc['row_len'] // 1024}k)", source=p.name))
    return rows


def headline(d: Path) -> list[tuple[str, str, str, str]]:
    """(what, target, measured, verdict) rows."""
    rows = []
    t7 = _load(d, "throughput_7b.json")
    variants = seven_b_variants(d)
    ours, ref = _variant(t7, "ours"), _variant(t7, "reference")
    best = max([v for v in variants if v["variant"].startswith("ours")], key=lambda v: v["mfu"], default={})
    if best:
        rows.append(("MFU, 7B layer shape x 8, UniToken mix: 6N (head on every token) + attention", ">= 55 %",
                     f"{best['mfu_6n_all']:.1%} ({best['variant']})", "met" if best["mfu_6n_all"] >= 0.55 else "missed"))
        rows.append(("  the same, counting the head only on supervised tokens (useful FLOPs)", ">= 55 %",
                     f"{best['mfu']:.1%} ({best['variant']}; {best['mfu_vs_measured']:.1%} of the matrix "
                     f"ceiling measured in that run)", "met" if best["mfu"] >= 0.55 else "missed"))
    if ours and ref and "tokens_per_s" in ours and "tokens_per_s" in ref:
        same = ours["tokens_per_s"] / ref["tokens_per_s"]
        rows.append(("tokens/s ours / reference batching, same samples, same process", ">= 1.5x",
                     f"{same:.2f}x ({ours['tokens_per_s']:,.0f} vs {ref['tokens_per_s']:,.0f})",
                     "met" if same >= 1.5 else "missed"))
        if best and best["source"] != "throughput_7b.json":
            rows.append(("  best 'ours' (separate process) / the same reference", ">= 1.5x",
                         f"{best['tokens_per_s'] / ref['tokens_per_s']:.2f}x ({best['tokens_per_s']:,.0f}, "
                         f"{best['variant']}, {best['source']})", ""))
    for name, label, issue in (("anchor-ckpt", "anchor: stock, dense 2 x 4096, every layer checkpointed", "37.2 %"),
                               ("anchor", "anchor: stock, dense 2 x 4096, no checkpointing", "46.2 %"),
                               ("anchor-ours", "ours on the anchor's dense batch (eager)", "-")):
        v = _variant(t7, name)
        if "mfu" in v:
            rows.append((label, f"issue: {issue}", f"{v['mfu']:.1%}, {v['tokens_per_s']:,.0f} tok/s, peak {v['peak_gib']} GiB",
                         "measured here"))
    vq = [dict(v, file=p.name) for p in sorted(d.glob("vq_encode*.json")) for v in json.loads(p.read_text())["variants"]
          if "images_per_s" in v]
    if vq:
        top = max(vq, key=lambda v: v["images_per_s"])
        single = next((v for v in vq if v["variant"] == "fp32-single"), None)
        rows.append(("VQ pre-tokenisation, 512 px", ">= 1,000 images/s",
                     f"{top['images_per_s']:,.0f} images/s ({top['variant']})"
                     + (f"; fp32 one at a time {single['images_per_s']:,.0f}" if single else ""),
                     "met" if top["images_per_s"] >= 1000 else "missed"))
    for p in sorted(d.glob("checkpoint_io*.json")):
        ck = json.loads(p.read_text())
        for v in ck["variants"]:
            if "blocking_s" in v:
                target = "blocking <= 10 s" if v["variant"] != "handoff" else "-"
                verdict = ("met" if v["blocking_s_7b_extrapolated"] <= 10 else "missed") if v["variant"] != "handoff" else ""
                rows.append((f"checkpoint {v['variant']}, 7B extrapolated x{ck['scale_to_7b']} from {ck['layers']} layer(s)",
                             target, f"blocking {v['blocking_s_7b_extrapolated']} s, on disk after "
                                     f"{v['total_s_7b_extrapolated']} s, load {v['load_s_7b_extrapolated']} s", verdict))
    return rows


def plot(d: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vs = seven_b_variants(d)
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=90)
    names = [v["variant"] for v in vs]
    colors = ["#2a7ab9" if n.startswith("ours") or n == "anchor-ours" else "#999999" for n in names]
    ax.barh(names, [v["mfu"] * 100 for v in vs], color=colors)
    for i, v in enumerate(vs):
        ax.text(v["mfu"] * 100 + 0.5, i, f"{v['mfu']:.1%}   {v['tokens_per_s'] / 1e3:.1f}k tok/s   {v['peak_gib']} GiB",
                va="center", fontsize=7)
    ax.axvline(55, color="k", ls="--", lw=0.8)
    ax.text(55.5, 0, "target 55 %", fontsize=7, va="center")
    ax.set_xlabel("MFU, % of 989 TFLOP/s (useful FLOPs: head on supervised tokens only)")
    ax.set_title("7B layer shape x 8 layers, one H200: UniToken stage-2 mix (anchor*: dense text 2 x 4096)", fontsize=9)
    ax.set_xlim(0, 85)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    table = Table(title="targets vs measured (benchmarks; the product path, issue 32, last)")
    for c in ("what", "target", "measured", "verdict"):
        table.add_column(c)
    for row in headline(args.dir):
        table.add_row(*row)
    product = _load(args.dir, "product_path.json")
    if product:  # issue 23: the commands users run, beside the benchmarks above
        from product_path import bench_tokens_per_s
        from product_path import rows as product_rows  # bench/ is the script's directory

        bench = bench_tokens_per_s(args.dir)
        loop = product.get("loop", {})
        if bench and "median_tokens_per_s" in loop and "vs_bench" not in loop:  # a run cut off before its end
            loop.update(bench_tokens_per_s=bench, vs_bench=round(loop["median_tokens_per_s"] / bench, 3))

        table.add_section()
        for row in product_rows(product):
            table.add_row(*row)
    Console(width=200).print(table)
    if args.plot:
        plot(args.dir, args.plot)


if __name__ == "__main__":
    main()
