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


def headline(d: Path) -> list[tuple[str, str, str, str]]:
    """(what, target, measured, verdict) rows."""
    rows = []
    t7 = _load(d, "throughput_7b.json")
    comp = _variant(_load(d, "throughput_7b_compile.json"), "ours-compile")
    ours, ref = _variant(t7, "ours"), _variant(t7, "reference")
    best = max([v for v in (t7 or {}).get("variants", []) if v.get("variant", "").startswith("ours") and "mfu" in v]
               + ([comp] if "mfu" in comp else []), key=lambda v: v["mfu"], default={})
    if best:
        rows.append(("MFU, 7B layer shape, UniToken mix (best 'ours')", ">= 55 %",
                     f"{best['mfu']:.1%} ({best['variant']}; {best.get('mfu_vs_measured') or 0:.1%} of measured ceiling)",
                     "met" if best["mfu"] >= 0.55 else "missed"))
    if ours and ref and "tokens_per_s" in ours and "tokens_per_s" in ref:
        bt = best.get("tokens_per_s", ours["tokens_per_s"])
        rows.append(("tokens/s ours / reference batching, same samples", ">= 1.5x",
                     f"{ours['tokens_per_s'] / ref['tokens_per_s']:.2f}x ('ours'), {bt / ref['tokens_per_s']:.2f}x (best)",
                     "met" if bt / ref["tokens_per_s"] >= 1.5 else "missed"))
    for name, label in (("anchor-ckpt", "anchor, every layer checkpointed"), ("anchor", "anchor, no checkpointing"),
                        ("anchor-ours", "ours on the anchor's dense batch")):
        v = _variant(t7, name)
        if "mfu" in v:
            ref_mfu = {"anchor-ckpt": "37.2 %", "anchor": "46.2 %"}.get(name, "-")
            rows.append((label, ref_mfu, f"{v['mfu']:.1%}, {v['tokens_per_s']:,.0f} tok/s, peak {v['peak_gib']} GiB", "reproduced" if name != "anchor-ours" else ""))
    vq = [v for doc in (_load(d, "vq_encode.json"), _load(d, "vq_encode_compile.json")) if doc
          for v in doc["variants"] if "images_per_s" in v]
    if vq:
        top = max(vq, key=lambda v: v["images_per_s"])
        single = next((v for v in vq if v["variant"] == "fp32-single"), None)
        rows.append(("VQ pre-tokenisation, 512 px", ">= 1,000 images/s",
                     f"{top['images_per_s']:,.0f} images/s ({top['variant']})"
                     + (f"; fp32 one at a time {single['images_per_s']:,.0f}" if single else ""),
                     "met" if top["images_per_s"] >= 1000 else "missed"))
    ck = _load(d, "checkpoint_io.json")
    if ck:
        for v in ck["variants"]:
            if "blocking_s" in v:
                rows.append((f"checkpoint {v['variant']} (7B, extrapolated x{ck['scale_to_7b']})",
                             "blocking <= 10 s" if v["variant"] != "handoff" else "-",
                             f"blocking {v['blocking_s_7b_extrapolated']} s, total {v['total_s_7b_extrapolated']} s, "
                             f"load {v['load_s_7b_extrapolated']} s",
                             ("met" if v["blocking_s_7b_extrapolated"] <= 10 else "missed") if v["variant"] != "handoff" else ""))
    return rows


def plot(d: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t7 = _load(d, "throughput_7b.json")
    comp = _variant(_load(d, "throughput_7b_compile.json"), "ours-compile")
    vs = [v for v in t7["variants"] if "mfu" in v] + ([comp] if "mfu" in comp else [])
    fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=100)
    names = [v["variant"] for v in vs]
    colors = ["#999999" if n.startswith(("reference", "anchor-ckpt", "anchor")) and n != "anchor-ours" else "#2a7ab9"
              for n in names]
    ax.barh(names, [v["mfu"] * 100 for v in vs], color=colors)
    for i, v in enumerate(vs):
        ax.text(v["mfu"] * 100 + 0.5, i, f"{v['mfu']:.1%}  {v['tokens_per_s'] / 1e3:.1f}k tok/s  {v['peak_gib']} GiB",
                va="center", fontsize=7)
    ax.axvline(55, color="k", ls="--", lw=0.8)
    ax.text(55.3, len(vs) - 0.6, "target 55 %", fontsize=7)
    ax.set_xlabel(f"MFU (% of 989 TFLOP/s), useful FLOPs; measured ceiling {t7['matmul_ceiling_tflops']} TFLOP/s")
    ax.set_title(f"7B layer shape x {t7['layers']} layers, one H200, stage-2 UniToken mix (anchor*: dense text)",
                 fontsize=9)
    ax.set_xlim(0, 80)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    table = Table(title="issue 8: targets vs measured")
    for c in ("what", "target", "measured", "verdict"):
        table.add_column(c)
    for row in headline(args.dir):
        table.add_row(*row)
    Console(width=200).print(table)
    if args.plot:
        plot(args.dir, args.plot)


if __name__ == "__main__":
    main()
