"""The data steps: validation, the VQ-GAN tokenizer, the initial model, pre-tokenisation (one
worker or a fan-out and its merge)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from unitoken.config import config_hash
from unitoken.model.devices import pick_device
from unitoken.pipeline.cache import StepCache, dataset_digest, model_digest, write_dataset_digest
from unitoken.pipeline.steps.runs import StepError, cached_step, step_run
from unitoken.recipes import get_recipe
from unitoken.registry import load_uri

log = logging.getLogger(__name__)


def validate(data_uri: str, out: Path, parent_run_id: str, max_reject_fraction: float = 0.01) -> dict:
    """Validate the data at ``data_uri`` (a local directory/manifest, or ``s3://bucket/prefix``)
    into ``out`` (clean.jsonl, rejected.jsonl, report.json/html, dataset.json -> the data root).

    Data on S3 stays there: it is fetched into a temporary directory to be checked and digested,
    and ``dataset.json`` records the prefix, so the Dataset artifact holds the manifest and
    reports, never the corpus; later steps fetch what they need (a pre-tokenisation worker only
    the images of its shards). A local path (a shared volume on a cluster) is referenced where it is.

    Raises:
        StepError: no manifest, or more rows rejected than ``max_reject_fraction`` allows.
    """
    import tempfile

    from unitoken.data.remote import materialise, split_s3
    from unitoken.data.validate import validate_manifest

    if not 0 <= max_reject_fraction <= 1:
        raise StepError(f"max_reject_fraction={max_reject_fraction}: use a fraction in [0, 1]")
    remote = data_uri.startswith("s3://")
    recorded = "s3://" + "/".join(x for x in split_s3(data_uri) if x) if remote else None
    with tempfile.TemporaryDirectory(prefix="unitoken-validate-") as scratch:
        local = materialise(data_uri, Path(scratch) / "data")
        manifest = local / "manifest.jsonl" if local.is_dir() else local
        if not manifest.is_file():
            raise StepError(f"data_uri {data_uri}: no manifest.jsonl there; point it at a data directory or a manifest")
        with step_run("validate", parent_run_id, {"data_uri": data_uri, "max_reject_fraction": max_reject_fraction}) as run:
            res = validate_manifest(manifest, out, recorded_root=recorded)
            run.metrics({"input_rows": res.input_rows, "clean_rows": res.clean_rows,
                         "rejected_rows": res.rejected_rows, "reject_fraction": res.reject_fraction})
            # clean rows + every image: the caches' data identity (images read where they were checked)
            data_sha = write_dataset_digest(Path(out), manifest.resolve().parent if remote else None)
            run.tags({"unitoken.validation_report_sha256": res.report_sha256, "unitoken.data_sha256": data_sha})
            for name in ("report.json", "report.html", "rejected.jsonl"):
                run.artifact(Path(out) / name, "validation")
            if res.reject_fraction > max_reject_fraction:
                raise StepError(f"{res.rejected_rows} of {res.input_rows} rows rejected ({res.reject_fraction:.2%} > "
                                f"max_reject_fraction {max_reject_fraction:.2%}); the reasons are in rejected.jsonl")
    return {"input_rows": res.input_rows, "clean_rows": res.clean_rows, "rejected_rows": res.rejected_rows,
            "report_sha256": res.report_sha256, "data_sha256": data_sha}


def data_root(dataset: Path) -> Path:
    """A local directory with the validated manifest's images (and the synthetic scenes): the
    recorded data root, or for data on S3 the whole prefix fetched once into a directory named
    by the data digest (evaluation and the gate read the source manifest and its images)."""
    import tempfile

    from unitoken.data.manifest import data_location
    from unitoken.data.remote import materialise

    location = data_location(Path(dataset) / "clean.jsonl")
    if not location.startswith("s3://"):
        return Path(location)
    return materialise(location, Path(tempfile.gettempdir()) / "unitoken-data" / dataset_digest(dataset)[:32])


def tokenizer(dataset: Path, recipe: str, overrides: list[str], released: str, steps: int, out: Path,
              parent_run_id: str, batch_size: int = 32, lr: float = 1e-3, cache: StepCache | None = None) -> dict:
    """The recipe's VQ tokenizer: a released VQ-GAN directory (``released``) copied as is, or
    one trained on the validated images when the recipe names none (cached: ``cached_step``)."""
    out = Path(out)
    if released:
        from unitoken.data.remote import materialise

        src = materialise(released, out)
        if not (src / "vqgan.ckpt").is_file() or not (src / "vqgan.yaml").is_file():
            raise StepError(f"tokenizer_uri {released}: expected a VQ-GAN directory (vqgan.yaml + vqgan.ckpt)")
        if src != out:
            shutil.copytree(src, out, dirs_exist_ok=True)
        return {"source": released}
    from unitoken.data.tokenizer_train import train_tokenizer

    cfg = get_recipe(recipe, overrides).model.vq

    def inputs():
        return {"data_sha256": dataset_digest(dataset), "vq_config_sha256": config_hash(cfg), "steps": steps,
                "batch_size": batch_size, "lr": lr, "device": pick_device()}

    def compute(tags):
        with step_run("tokenizer", parent_run_id, {"recipe": recipe, "steps": steps, "batch_size": batch_size,
                                                   "lr": lr}) as run:
            run.tags(tags)
            report = train_tokenizer(Path(dataset) / "clean.jsonl", out, cfg, steps=steps, batch_size=batch_size,
                                     lr=lr)
            run.metrics({k: report[k] for k in ("psnr", "codebook_usage") if isinstance(report.get(k), (int, float))})
            run.artifact(out / "report.json", "tokenizer")
            run.artifact(out / "reconstructions.png", "tokenizer")
        return {k: report.get(k) for k in ("psnr", "codebook_usage", "train_seconds")}, run.run_id

    return cached_step("tokenizer", "tokenizer", inputs, out, cache, parent_run_id, compute)


def init_model(recipe: str, overrides: list[str], tokenizer_dir: Path | None, base_model: str, out: Path,
               seed: int = 0) -> dict:
    """The model stage 1 (or the first stage run) starts from: a fresh one from the recipe with
    the tokenizer, or a registered model (``models:/NAME@ALIAS``, stage-scoped retraining)."""
    out = Path(out)
    if base_model:
        shutil.copytree(load_uri(base_model), out, dirs_exist_ok=True)
        return {"source": base_model}
    from unitoken.model.io import init_model as build
    from unitoken.model.io import save_model

    cfg = get_recipe(recipe, overrides).model
    model, tok = build(cfg, [tokenizer_dir] if tokenizer_dir else [], seed=seed)
    save_model(model, tok, out, recipe=recipe)
    return {"source": f"recipe {recipe}", "parameters": model.num_parameters()["total"]}


def pretokenize_worker(dataset: Path, model_dir: Path, out: Path, parent_run_id: str | None, worker: int = 0,
                       num_workers: int = 1, shard_size: int = 1024, work: Path | None = None,
                       cache: StepCache | None = None) -> dict:
    """One pre-tokenisation worker: the shards of range ``worker`` of ``num_workers``
    (``unitoken.data.pretokenize.shard_ranges``) into ``out``; images on S3 are fetched for these
    shards only. With ``work`` (the checkpoint volume on a cluster) shards are built there, so a
    retried pod resumes at the shard that was cut off, then copied into ``out``.

    Cached per shard range (``cached_step``): the key is the data, the model's VQ-GAN (the model
    digest), the device type, the shard size and the range, so a re-run with the same layout
    reuses every worker's output; a new worker count gives new ranges and recomputes.
    """
    from unitoken.data.pretokenize import count_records, num_shards, pretokenize, shard_ranges
    from unitoken.model.io import load_model

    manifest = Path(dataset) / "clean.jsonl"
    first, last = shard_ranges(num_shards(count_records(manifest), shard_size), num_workers)[worker]
    name = f"pretokenize-w{worker}"
    params = {"worker": worker, "num_workers": num_workers, "shard_size": shard_size, "first_shard": first,
              "last_shard": last}

    def inputs():
        return {"data_sha256": dataset_digest(dataset), "model_sha256": model_digest(model_dir), "device": pick_device(),
                "shard_size": shard_size, "shards": [first, last]}

    def compute(tags):
        model, _ = load_model(model_dir)
        with step_run(name, parent_run_id, params) as run:
            run.tags(tags)
            target = Path(work) if work else Path(out)
            summary = pretokenize(manifest, model, target, shard_size=shard_size, worker=worker,
                                  num_workers=num_workers)
            if work:
                _publish_shards(target, Path(out))
            run.metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        return summary, run.run_id

    return cached_step("pretokenize", name, inputs, out, cache, parent_run_id, compute)


def pretokenize(dataset: Path, model_dir: Path, out: Path, parent_run_id: str | None,
                cache: StepCache | None = None, shard_size: int = 1024) -> dict:
    """Pre-tokenisation on this pod alone: one worker over every shard, index.json included (the
    small study's step; the pipeline fans out instead, ``pretokenize_worker`` + ``pretokenize_merge``)."""
    return pretokenize_worker(dataset, model_dir, out, parent_run_id, shard_size=shard_size, cache=cache)


def _publish_shards(work: Path, out: Path) -> None:
    """A finished worker's output from its work directory into its output artifact (the same
    files as building there); the work directory goes (on a cluster it is the shared volume, and
    the output is what counts now)."""
    shutil.copytree(work, out, dirs_exist_ok=True)
    shutil.rmtree(work)


def pretokenize_merge(parts: list[Path], out: Path, parent_run_id: str | None,
                      worker_cache: list[str] | None = None) -> dict:
    """The workers' shards together in ``out`` with plan.json and index.json: the bytes one
    worker writes over the whole manifest. Its MLflow run ``pretokenize`` carries the totals and
    ``unitoken.cache`` = hit (every worker reused its output) | miss | partial | off."""
    from unitoken.data.pretokenize import merge

    states = sorted(set(worker_cache or []))
    cache_state = states[0] if len(states) == 1 else ("partial" if states else "off")
    with step_run("pretokenize", parent_run_id, {"workers": len(parts)}) as run:
        run.tags({"unitoken.cache": cache_state, "unitoken.cache_workers": ",".join(worker_cache or [])})
        summary = merge([Path(p) for p in parts], Path(out))
        run.metrics(summary)
        run.artifact(Path(out) / "index.json", "pretokenized")
    return {**summary, "cache": cache_state}
