"""``unitoken plan``: what a run will cost before it is submitted.

Per stage, from the pre-tokenised data and the stage's mixture: the samples (batch x steps), the
tokens (the mean tokens a sample of the stage's mixture has, counted by building the sequences of
up to ``sample_records`` records of each pool with the recipe's tokenizer), the useful FLOPs
(``unitoken.train.flops``: 6 x parameters per token, the head on supervised tokens, attention,
the vision tower on tiles), and from them GPU-hours and wall-clock at a measured MFU:

    GPU-hours = FLOPs / (MFU x 989 TFLOP/s) / 3600      wall-clock = GPU-hours / the stage's GPUs

The MFU is ``unitoken train``'s, measured (the median of the second half of a metrics.jsonl of
the training loop on the 7B layer shape, docs/performance.md), not the benchmark's. With a
cluster config, the stage's GPUs are its pod's (or TrainJob's nodes x GPUs), checked against the
node pool it selects and the Kueue ClusterQueue's GPU quota.
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml

from unitoken.config import Recipe
from unitoken.data.dataset import ShardDataset
from unitoken.train.flops import H100_H200_PEAK_BF16, FlopCounter

ROOT = Path(__file__).resolve().parents[2]
# the training loop's measured metrics (one H100, unitoken-7b-fast at 8 layers, docs/performance.md)
LOOP_METRICS = ROOT / "docs" / "results" / "issue32" / "session12_h100" / "call2_loop_files" / "metrics.jsonl"
KUEUE = ROOT / "k8s" / "components" / "kueue" / "kueue.yaml"


@dataclass(frozen=True)
class StagePlan:
    stage: int
    samples: int
    tokens: float
    flops: float
    gpu_hours: float
    gpus: int
    wall_hours: float
    records_counted: int
    records: int
    fits: list[str]  # what was checked against the cluster, each "ok: ..." or "NO: ..."

    def as_row(self) -> dict:
        return {"stage": self.stage, "samples": self.samples, "tokens": round(self.tokens),
                "flops": self.flops, "gpu_hours": round(self.gpu_hours, 2), "gpus": self.gpus,
                "wall_hours": round(self.wall_hours, 2), "records_counted": self.records_counted,
                "records": self.records, "fits": self.fits}


def measured_mfu(metrics: Path = LOOP_METRICS) -> float:
    """The median MFU of the second half of a training loop's metrics.jsonl (the first half pays for
    compilation)."""
    rows = [json.loads(x) for x in Path(metrics).read_text().splitlines() if x.strip()]
    tail = [r["mfu"] for r in rows[len(rows) // 2:] if "mfu" in r]
    if not tail:
        raise ValueError(f"{metrics}: no mfu in its rows; pass the metrics.jsonl of a GPU run")
    return statistics.median(tail)


def flop_counter(recipe: Recipe) -> tuple[FlopCounter, object]:
    """The recipe's parameter counts (the model built on the meta device: no memory) and its tokenizer."""
    import torch

    from unitoken.model.tokens import build_tokenizer
    from unitoken.model.unitoken import UniToken

    cfg = recipe.model
    tok = build_tokenizer(cfg.llm.vocab_size, cfg.vq.num_codes, cfg.max_grid_tokens)
    with torch.device("meta"):
        model = UniToken(cfg, tok.get_vocab())
    return FlopCounter.for_model(model), tok


def stage_pools(recipe: Recipe, stage_n: int) -> tuple[dict[str, float], str, list[str] | None]:
    """(pool weights, "sources" or "tasks", the sources the stage reads or None for all)."""
    stage = recipe.train.stage(stage_n)
    weighted = {k: w for k, w in stage.source_weights.items() if w > 0}
    if weighted:
        return weighted, "sources", sorted(weighted)
    ratios = {"understanding": stage.understanding_ratio, "generation": stage.generation_ratio, "text": stage.text_ratio}
    return {k: v for k, v in ratios.items() if v > 0}, "tasks", list(stage.sources) or None


def per_sample(ds: ShardDataset, counter: FlopCounter, pools: dict[str, float], kind: str,
               sample_records: int, seed: int = 0) -> tuple[float, float, int]:
    """(mean tokens, mean FLOPs) of a sample drawn from the mixture, and the records counted."""
    key = ds.record_sources() if kind == "sources" else ds.tasks()
    by_pool: dict[str, list[int]] = {}
    for i, k in enumerate(key):
        by_pool.setdefault(k, []).append(i)
    total = sum(pools.values())
    tokens = flops = 0.0
    counted = 0
    for name, weight in pools.items():
        idx = by_pool.get(name, [])
        if not idx:
            raise ValueError(f"the data has no {kind[:-1]} {name!r} (it has {sorted(by_pool)})")
        if len(idx) > sample_records:
            idx = sorted(random.Random(f"{seed}-{name}").sample(idx, sample_records))
        samples = [ds[i] for i in idx]
        counted += len(samples)
        tokens += weight / total * statistics.fmean(len(s) for s in samples)
        flops += weight / total * statistics.fmean(counter.of([s]) for s in samples)
    return tokens, flops, counted


def kueue_gpu_quota(path: Path = KUEUE) -> int | None:
    """The GPUs the Kueue ClusterQueue allows (sum of ``nvidia.com/gpu`` nominal quotas), if found."""
    if not Path(path).is_file():
        return None
    total = 0
    for doc in yaml.safe_load_all(Path(path).read_text()):
        if not doc or doc.get("kind") != "ClusterQueue":
            continue
        for group in doc["spec"].get("resourceGroups", []):
            for flavor in group.get("flavors", []):
                total += sum(int(r["nominalQuota"]) for r in flavor.get("resources", []) if r["name"] == "nvidia.com/gpu")
    return total


def fits(cluster, step: str, quota: int | None) -> tuple[int, list[str]]:
    """(the step's GPUs, what the cluster says about them)."""
    res = cluster.resources(step)
    gpus = res.gpus * res.num_nodes
    notes = []
    pools = [(name, p) for name, p in cluster.node_pools.items()
             if p.gpus and all(p.node_selector.get(k) == v for k, v in res.node_selector.items())]
    if not pools:
        notes.append(f"NO: no node pool matches {step}'s node selector {res.node_selector}")
    for name, p in pools:
        ok = res.gpus <= p.gpus and res.num_nodes <= p.nodes
        notes.append(f"{'ok' if ok else 'NO'}: node pool {name} ({p.nodes} nodes x {p.gpus} GPUs) "
                     f"{'holds' if ok else 'cannot hold'} {res.num_nodes} x {res.gpus}")
    if quota is not None:
        notes.append(f"{'ok' if gpus <= quota else 'NO'}: Kueue quota {quota} GPUs, the step asks {gpus}")
    return gpus, notes


def plan(recipe: Recipe, data: Path, cluster=None, mfu: float | None = None, loop_metrics: Path | None = None,
         sample_records: int = 2000, stages: tuple[int, ...] = (1, 2, 3)) -> dict:
    """The plan of ``recipe`` on ``data`` (``cluster``: a ``ClusterConfig``, checked against its node
    pools and the Kueue quota; None: one GPU a stage) at ``mfu``, else at the MFU measured in
    ``loop_metrics`` (default ``LOOP_METRICS``); ``mfu_source`` in the result says which."""
    from unitoken.model.sequence import SequenceBuilder
    from unitoken.model.tokens import SpecialTokens

    counter, tok = flop_counter(recipe)
    source = f"--mfu {mfu}" if mfu is not None else f"the training loop measured in {loop_metrics or LOOP_METRICS}"
    mfu = mfu if mfu is not None else measured_mfu(loop_metrics or LOOP_METRICS)
    quota = kueue_gpu_quota() if cluster is not None else None
    rate = mfu * H100_H200_PEAK_BF16
    out = []
    for n in stages:
        stage = recipe.train.stage(n)
        weights, kind, sources = stage_pools(recipe, n)
        builder = SequenceBuilder(SpecialTokens.from_vocab(tok.get_vocab(), recipe.model.max_grid_tokens), tok,
                                  recipe.model)
        ds = ShardDataset(data, builder, sources=sources, splits=["train"])
        tokens, flops, counted = per_sample(ds, counter, weights, kind, sample_records)
        samples = stage.batch_size * stage.max_steps
        gpu_hours = samples * flops / rate / 3600
        gpus, notes = (fits(cluster, f"train-stage{n}", quota) if cluster is not None else (1, []))
        out.append(StagePlan(n, samples, samples * tokens, samples * flops, gpu_hours, gpus, gpu_hours / gpus,
                             counted, len(ds), notes))
    return {"recipe": recipe.name, "mfu": mfu, "mfu_source": source, "peak_flops": H100_H200_PEAK_BF16, "stages": [p.as_row() for p in out],
            "gpu_hours": round(sum(p.gpu_hours for p in out), 2), "wall_hours": round(sum(p.wall_hours for p in out), 2)}
