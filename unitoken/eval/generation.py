"""Generation suites: ``shapes-geneval`` and GenEval's prompt-metadata format.

Each prompt carries a GenEval-style spec (``include``: objects with class, count, colour,
position relative to another object). An image is generated, a detector lists what it sees,
and the spec is checked: 1 if every requirement holds, else 0, with the reason kept. The
detector is pluggable (``Detector`` protocol); ``ShapesDetector`` reads our rendered shapes
deterministically. GenEval's real-photo prompts need a real object detector plugged in.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image

from unitoken.data.shapes import Detection, detect
from unitoken.data.synth import NUMBER_WORDS, load_scenes, relation


class Detector(Protocol):
    def __call__(self, image: Image.Image) -> list[Detection]: ...


@dataclass
class ShapesDetector:
    """The deterministic detector of the synthetic shapes world."""

    def __call__(self, image: Image.Image) -> list[Detection]:
        return detect(image)


def load_detector(spec: str | None) -> Detector:
    """``None`` -> ShapesDetector; ``pkg.module:Class`` -> that class, instantiated."""
    if not spec:
        return ShapesDetector()
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"--detector {spec!r}: use module.path:ClassName")
    return getattr(importlib.import_module(module), name)()


def spec_from_scene(scene: dict) -> list[dict]:
    """GenEval-style requirements of a synthetic scene's prompt category."""
    objs, cat = scene["objects"], scene["category"]
    if cat == "single_object":
        return [{"class": objs[0].shape, "count": 1}]
    if cat == "colors":
        return [{"class": objs[0].shape, "count": 1, "color": objs[0].color}]
    if cat == "two_objects":
        return [{"class": o.shape, "count": 1} for o in objs]
    if cat == "color_attr":
        return [{"class": o.shape, "count": 1, "color": o.color} for o in objs]
    if cat == "position":
        a, b = objs
        return [{"class": b.shape, "count": 1}, {"class": a.shape, "count": 1, "position": (relation(a, b), 0)}]
    if cat == "counting":
        return [{"class": objs[0].shape, "count": len(objs), "exact": True}]
    return [{"class": o.shape, "count": 1, "color": o.color, "cell": [o.row, o.col]} for o in objs] + \
        [{"total": len(objs)}]


def shapes_geneval_items(data_dir: Path, limit: int | None = None, split: str = "test") -> list[dict]:
    scenes_path = Path(data_dir) / "scenes.jsonl"
    if not scenes_path.is_file():
        raise FileNotFoundError(f"{data_dir}: no scenes.jsonl; create the data with `unitoken data synth`")
    items = [{"id": s["id"], "category": s["category"], "prompt": s["prompt"], "include": spec_from_scene(s),
              "reference": str(Path(data_dir) / s["image"])} for s in load_scenes(scenes_path, split)]
    return items[:limit] if limit else items


def geneval_items(metadata: Path, limit: int | None = None) -> list[dict]:
    """GenEval's ``evaluation_metadata.jsonl`` (tag, prompt, include[{class, count, color?, position?}])."""
    items = []
    for i, line in enumerate(Path(metadata).read_text().splitlines()):
        if not line.strip():
            continue
        rec = json.loads(line)
        include = []
        for req in rec["include"]:
            r = {"class": req["class"], "count": req.get("count", 1), "exact": rec["tag"] == "counting"}
            if "color" in req:
                r["color"] = req["color"]
            if "position" in req:
                r["position"] = tuple(req["position"])
            include.append(r)
        items.append({"id": f"geneval-{i:04d}", "category": rec["tag"], "prompt": rec["prompt"], "include": include})
    return items[:limit] if limit else items


def _matches(det: Detection, req: dict) -> bool:
    return det.shape == req["class"] and ("color" not in req or det.color == req["color"]) and \
        ("cell" not in req or [det.row, det.col] == list(req["cell"]))


def _related(a: Detection, b: Detection, rel: str) -> bool:
    return {"left of": a.col < b.col, "right of": a.col > b.col, "above": a.row < b.row,
            "below": a.row > b.row}.get(rel, False)


def check(include: list[dict], detections: list[Detection]) -> tuple[bool, str]:
    """GenEval's rule set over detections -> (correct, reason)."""
    found: list[list[Detection]] = []
    for req in include:
        if "total" in req:
            if len(detections) != req["total"]:
                return False, f"expected {req['total']} objects, found {len(detections)}"
            found.append([])
            continue
        hits = [d for d in detections if _matches(d, req)]
        want = req.get("count", 1)
        if (req.get("exact") and len(hits) != want) or len(hits) < want:
            what = " ".join(x for x in (req.get("color"), req["class"]) if x)
            return False, f"expected {NUMBER_WORDS.get(want, want)} {what}, found {len(hits)}"
        if "position" in req:
            rel, target = req["position"]
            if not any(_related(h, t, rel) for h in hits for t in found[target]):
                return False, f"{req['class']} is not {rel} the {include[target]['class']}"
        found.append(hits)
    return True, "all requirements met"


def random_code_baseline(model, items: list[dict], detector: Detector, seed: int = 0) -> float:
    """Chance level of a generation suite: score of uniformly random VQ codes through the same
    decoder and detector (random blobs do sometimes pass a lenient check)."""
    import torch

    from unitoken.model.generation import decode_images

    g = torch.Generator().manual_seed(seed)
    side = model.config.vq.codes_per_side
    codes = torch.stack([torch.randint(0, model.config.vq.num_codes, (side, side), generator=g) for _ in items]) \
        if items else torch.zeros((0, side, side), dtype=torch.long)
    hits = sum(check(item["include"], detector(image))[0]
               for item, image in zip(items, decode_images(model, codes)))
    return hits / len(items) if items else 0.0


def run_generation(model, builder, items: list[dict], out_dir: Path, detector: Detector, cfg_scale: float = 3.0,
                   top_k: int = 0, temperature: float = 1.0, seed: int = 0, batch_size: int = 64,
                   progress=None) -> list[dict]:
    """Generate one image per prompt (saved under ``out_dir/images``) and check it. Item i is
    sampled with seed ``seed + i`` whatever the batch size."""
    from unitoken.model.generation import decode_images, generate_image_codes_batch

    images_dir = Path(out_dir) / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        codes = generate_image_codes_batch(model, builder, [i["prompt"] for i in chunk], cfg_scale=cfg_scale,
                                           temperature=temperature, top_k=top_k,
                                           seeds=[seed + start + k for k in range(len(chunk))])
        for item, image in zip(chunk, decode_images(model, codes)):
            path = images_dir / f"{item['id']}.png"
            image.save(path)
            found = detector(image)
            ok, reason = check(item["include"], found)
            results.append({"id": item["id"], "category": item["category"], "prompt": item["prompt"],
                            "image": str(path.relative_to(out_dir)), "score": float(ok), "reason": reason,
                            # what the detector did see, so a failure can be read without the image
                            "detected": [f"{d.size} {d.color} {d.shape} (row {d.row}, col {d.col})" for d in found]})
        if progress:
            progress(len(results), len(items))
    return results
