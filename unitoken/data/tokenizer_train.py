"""``unitoken tokenizer train``: train the recipe's VQ-GAN where no released one fits.

UniToken imports Chameleon's frozen VQ-GAN; the ``tiny``/``small`` recipes and the synthetic
data need a tokenizer that reconstructs *their* images, or generated images cannot be judged.
This trains encoder, codebook and decoder with an L1 + L2 reconstruction loss and the VQ
codebook/commitment loss (beta 0.25, straight-through estimator). Codes unused over a window
are restarted from encoder outputs of the current batch, so the codebook stays in use. There
is no adversarial or perceptual loss: flat-coloured shapes do not need one (documented gap
for natural images).

Output is Chameleon's released layout (``vqgan.yaml`` + ``vqgan.ckpt``), so
``unitoken model init --tokenizer DIR`` loads it like the real one; plus ``report.json`` and
``reconstructions.png``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from unitoken.config import VQConfig
from unitoken.data.manifest import data_location, load_records, resolve_image
from unitoken.data.remote import RemoteDataError, fetch_images
from unitoken.model.devices import pick_device
from unitoken.model.vision import to_pil, vq_pixels
from unitoken.model.vq import VQTokenizer

log = logging.getLogger(__name__)


def _images(manifest: Path, split: str, resolution: int, limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    seen, paths = set(), []
    for rec in load_records(manifest):
        if rec.get("split", "train") != split:
            continue
        for rel in [rec["image"]] if isinstance(rec.get("image"), str) else rec.get("image", []):
            if rel not in seen:
                seen.add(rel)
                paths.append(rel)
    paths = paths[:limit] if limit else paths
    pixels = []
    with tempfile.TemporaryDirectory(prefix="unitoken-images-") as spool:
        location = data_location(manifest)
        if location.startswith("s3://"):  # data validated from S3 stays there: fetch what is used
            fetch_images(location, paths, Path(spool))
            location = spool
        for rel in paths:
            with Image.open(resolve_image(rel, Path(location))) as im:
                pixels.append(vq_pixels(im, resolution))
    if not pixels:
        raise ValueError(f"{manifest}: no images in split {split!r}")
    return torch.stack(pixels), paths


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a.float(), b.float()).item()
    return 10 * math.log10(4.0 / mse) if mse > 0 else float("inf")


def taming_yaml(cfg: VQConfig) -> dict:
    return {"model": {"target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": cfg.embed_dim, "n_embed": cfg.num_codes,
        "ddconfig": {"double_z": False, "z_channels": cfg.latent_channels, "resolution": cfg.resolution,
                     "in_channels": 3, "out_ch": 3, "ch": cfg.base_channels,
                     "ch_mult": list(cfg.channel_multiplier), "num_res_blocks": cfg.num_res_blocks,
                     "attn_resolutions": list(cfg.attn_resolutions), "dropout": 0.0}}}}


def save_vqgan(vq: VQTokenizer, out: Path) -> None:
    """Chameleon's layout: vqgan.yaml (taming) + vqgan.ckpt ({"state_dict": tensors})."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "vqgan.yaml").write_text(yaml.safe_dump(taming_yaml(vq.cfg), sort_keys=False))
    state = {k: v.detach().cpu().contiguous() for k, v in vq.state_dict().items()}
    tmp = out / "vqgan.ckpt.tmp"
    torch.save({"state_dict": state}, tmp)
    tmp.replace(out / "vqgan.ckpt")


@torch.no_grad()
def evaluate_vq(vq: VQTokenizer, images: torch.Tensor, batch_size: int = 64) -> dict:
    recon, codes = [], []
    for i in range(0, len(images), batch_size):
        c = vq.encode(images[i : i + batch_size])
        codes.append(c)
        recon.append(vq.decode(c))
    recon_t, codes_t = torch.cat(recon), torch.cat(codes)
    used = int(torch.unique(codes_t).numel())
    return {"psnr_db": round(psnr(recon_t, images), 2), "codebook_used": used,
            "codebook_usage": round(used / vq.cfg.num_codes, 4), "recon": recon_t}


def train_tokenizer(data: str | Path, out: str | Path, cfg: VQConfig, steps: int = 2000, batch_size: int = 32,
                    lr: float = 1e-3, seed: int = 0, device: str = "auto", progress=None) -> dict:
    """Train a VQ-GAN on the train split of ``data`` (a directory with manifest.jsonl, or a manifest)."""
    data, out = Path(data), Path(out)
    manifest = data / "manifest.jsonl" if data.is_dir() else data
    dev = torch.device(pick_device(device))
    torch.manual_seed(seed)
    rng = random.Random(seed)
    train_x, _ = _images(manifest, "train", cfg.resolution)
    test_x, test_paths = _images(manifest, "test", cfg.resolution)
    vq = VQTokenizer(cfg).to(dev)
    vq.requires_grad_(True)
    super(VQTokenizer, vq).train(True)  # VQTokenizer.train() pins eval mode; training it is the exception
    opt = torch.optim.AdamW(vq.parameters(), lr=lr, betas=(0.5, 0.9), weight_decay=0.0)
    # OneCycle needs >= 2 warm-up steps (a 1-step warm-up divides by zero in torch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=min(0.5, max(0.05, 2.5 / steps)))
    usage = torch.zeros(cfg.num_codes, device=dev)
    start, log = time.perf_counter(), []
    for step in range(steps):
        idx = [rng.randrange(len(train_x)) for _ in range(batch_size)]
        x = train_x[idx].to(dev)
        if rng.random() < 0.5:
            x = x.flip(-1)  # mirror: cells swap columns, the world stays valid
        z = vq.quant_conv(vq.encoder(x))
        zq, vq_loss, codes = vq.quantize(z)
        recon = vq.decoder(vq.post_quant_conv(zq))
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        usage.index_add_(0, codes, torch.ones_like(codes, dtype=usage.dtype))
        if (step + 1) % 100 == 0 and step < steps * 0.8:
            _restart_dead_codes(vq, z.detach(), usage)
            usage.zero_()
        if (step + 1) % 50 == 0:
            log.append({"step": step + 1, "loss": round(loss.item(), 5)})
        if progress:
            progress(step + 1, steps, loss.item())
    vq.freeze()
    seconds = time.perf_counter() - start
    vq = vq.cpu()
    metrics = evaluate_vq(vq, test_x)
    recon = metrics.pop("recon")
    # the scenes lie in the data root: a validated clean.jsonl's dataset.json points there
    with tempfile.TemporaryDirectory(prefix="unitoken-scenes-") as spool:
        recognised = _recognition(_scenes_dir(manifest, Path(spool)), test_paths, recon)
    save_vqgan(vq, out)
    _grid(test_x[:16], recon[:16]).save(out / "reconstructions.png")
    report = {"config": taming_yaml(cfg), "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
              "device": str(dev), "train_images": len(train_x), "test_images": len(test_x),
              "train_seconds": round(seconds, 1), **metrics, **recognised, "loss_log": log}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _restart_dead_codes(vq: VQTokenizer, z: torch.Tensor, usage: torch.Tensor) -> None:
    """Move never-chosen codes onto random encoder outputs (keeps the codebook in use)."""
    dead = (usage == 0).nonzero().squeeze(1)
    if dead.numel() == 0:
        return
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    pick = torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)
    with torch.no_grad():
        vq.quantize.embedding.weight[dead] = flat[pick] + 0.01 * torch.randn_like(flat[pick])


def _scenes_dir(manifest: Path, spool: Path) -> Path:
    """The directory holding the data set's ``scenes.jsonl`` (synthetic data's annotations): the
    data root, or for data on S3 ``spool``, where it is fetched to (real data has none)."""
    location = data_location(manifest)
    if not location.startswith("s3://"):
        return Path(location)
    try:
        fetch_images(location, ["scenes.jsonl"], spool)
    except RemoteDataError as err:  # real data has no scene annotations: no recognition rate
        log.info("no scenes.jsonl beside %s (%s): the VQ-GAN's recognition rate is not measured", location, err)
    return spool


def _recognition(data_dir: Path, paths: list[str], recon: torch.Tensor) -> dict:
    """Share of annotated objects the shapes detector finds in the reconstructions."""
    scenes_path = data_dir / "scenes.jsonl"
    if not scenes_path.is_file():
        return {}
    from unitoken.data.shapes import recognised
    from unitoken.data.synth import load_scenes

    by_image = {s["image"]: s["objects"] for s in load_scenes(scenes_path)}
    hits = total = 0
    for rel, pixels in zip(paths, recon):
        objects = by_image.get(rel)
        if objects:
            flags = recognised(objects, to_pil(pixels))
            hits += sum(flags)
            total += len(flags)
    return {"objects_recognised": hits, "objects_total": total,
            "recognition_rate": round(hits / total, 4) if total else None}


def _grid(originals: torch.Tensor, recon: torch.Tensor) -> Image.Image:
    """Two rows per block: originals above their reconstructions."""
    n, r = originals.shape[0], originals.shape[-1]
    canvas = Image.new("RGB", (n * r, 2 * r), (255, 255, 255))
    for i in range(n):
        canvas.paste(to_pil(originals[i]), (i * r, 0))
        canvas.paste(to_pil(recon[i]), (i * r, r))
    return canvas
