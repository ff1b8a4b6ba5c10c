"""``unitoken data synth``: a synthetic shapes data set with a known answer.

Per scene (1-4 objects in a 2x2 grid; shape x colour x size x cell):
    * a caption                                (source synth-caption,  stage 1)
    * question-answer pairs: colour, shape, count, position, multiple choice
                                               (source synth-vqa,      stage 2 understanding)
    * a text-to-image prompt of a GenEval-style category: single_object, two_objects,
      colors                                   (source synth-t2i,      stage 2 generation)
      or fine-grained: counting, position, color_attr, full description
                                               (source synth-t2i-fine, stage 2/3 generation)
    * a multi-turn dialogue                    (source synth-dialogue, stage 3)

Files: ``DIR/manifest.jsonl`` (reference conversation format + task/source/split/meta),
``DIR/scenes.jsonl`` (object annotations for evaluation), ``DIR/images/<split>/<id>.png``.
Deterministic for a seed: the same arguments give byte-identical files.
"""

from __future__ import annotations

import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from unitoken.data.shapes import CELLS, COLORS, SHAPES, SIZES, ShapeObject, render
from unitoken.model.sequence import T2I_TEMPLATE
from unitoken.model.tokens import IMAGE_PLACEHOLDER

CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attr", "full")
FINE_GRAINED = ("counting", "position", "color_attr", "full")  # stage-3 generation data
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
SPLITS = (("train", 0.8), ("val", 0.1), ("test", 0.1))
MC_SUFFIX = "Answer with the option's letter from the given choices directly."


@dataclass
class Scene:
    id: str
    split: str
    category: str
    objects: list[ShapeObject]
    prompt: str


def _plural(shape: str) -> str:
    return shape + "s"


def _sample_objects(rng: random.Random, category: str) -> list[ShapeObject]:
    """Objects that make the category's prompt true (and its checks meaningful)."""
    def obj(cell, shape=None, color=None):
        return ShapeObject(shape or rng.choice(SHAPES), color or rng.choice(list(COLORS)),
                           rng.choice(list(SIZES)), cell[0], cell[1],
                           round(rng.uniform(-1, 1), 3), round(rng.uniform(-1, 1), 3))

    cells = list(CELLS)
    rng.shuffle(cells)
    if category in ("single_object", "colors"):
        return [obj(cells[0])]
    if category in ("two_objects", "color_attr", "position"):
        first, second = rng.sample(SHAPES, 2)  # distinct shapes: the prompt names each unambiguously
        return [obj(cells[0], first), obj(cells[1], second)]
    if category == "counting":
        shape = rng.choice(SHAPES)
        return [obj(c, shape) for c in cells[: rng.randint(2, 4)]]
    return [obj(c) for c in cells[: rng.randint(1, 4)]]


def relation(a: ShapeObject, b: ShapeObject) -> str:
    """Spatial relation of a to b, as GenEval phrases it."""
    if a.col != b.col:
        return "left of" if a.col < b.col else "right of"
    return "above" if a.row < b.row else "below"


def t2i_prompt(category: str, objects: list[ShapeObject]) -> str:
    if category == "single_object":
        return f"a {objects[0].shape}"
    if category == "colors":
        return f"a {objects[0].color} {objects[0].shape}"
    if category == "two_objects":
        return f"a {objects[0].shape} and a {objects[1].shape}"
    if category == "color_attr":
        return f"a {objects[0].color} {objects[0].shape} and a {objects[1].color} {objects[1].shape}"
    if category == "position":
        return f"a {objects[0].shape} {relation(objects[0], objects[1])} a {objects[1].shape}"
    if category == "counting":
        return f"{NUMBER_WORDS[len(objects)]} {_plural(objects[0].shape)}"
    return caption(objects)


def t2i_views(category: str, objects: list[ShapeObject]) -> list[tuple[str, str]]:
    """The other categories' prompts that are exactly true of a scene's objects, as (category,
    prompt): a one-object scene is also "a circle", "a red circle" and its full description; two
    objects of distinct shapes are also "a circle and a square", their colours and their relation;
    two to four objects of one shape are also their count. The scene's own category is left out."""
    shapes = {o.shape for o in objects}
    views = ["full"]
    if len(objects) == 1:
        views += ["single_object", "colors"]
    elif len(objects) == 2 and len(shapes) == 2:
        views += ["two_objects", "color_attr", "position"]
    if len(objects) >= 2 and len(shapes) == 1:
        views.append("counting")
    return [(c, t2i_prompt(c, objects)) for c in views if c != category]


def caption(objects: list[ShapeObject]) -> str:
    parts = [f"a {o.describe()} in the {o.position}" for o in sorted(objects, key=lambda o: (o.row, o.col))]
    if len(parts) == 1:
        return f"There is {parts[0]}."
    listing = ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"There are {NUMBER_WORDS[len(parts)]} objects: {listing}."


def questions(rng: random.Random, objects: list[ShapeObject]) -> list[dict]:
    """Question-answer pairs with a type and (for multiple choice) the options."""
    target = rng.choice(objects)
    qa = [
        {"type": "color", "question": f"What color is the object in the {target.position}?",
         "answer": target.color},
        {"type": "shape", "question": f"What shape is the object in the {target.position}?",
         "answer": target.shape},
        {"type": "count", "question": "How many objects are in the image?", "answer": str(len(objects))},
    ]
    unique = [o for o in objects if sum(p.color == o.color and p.shape == o.shape for p in objects) == 1]
    if unique:
        o = rng.choice(unique)
        qa.append({"type": "position", "question": f"Where is the {o.color} {o.shape}?", "answer": o.position})
    attr, universe = rng.choice([("color", list(COLORS)), ("shape", list(SHAPES))])
    truth = getattr(target, attr)
    qa.append(_mc(rng, f"mc_{attr}", f"What {attr} is the object in the {target.position}?", truth,
                  [v for v in universe if v != truth]))
    return qa


def mc_drill(rng: random.Random, objects: list[ShapeObject], position: bool = False) -> list[dict]:
    """Extra multiple-choice questions for training scenes: colour and shape of one object, and
    the count, each with four shuffled options. One MC question per scene (1/15 of
    the samples) was never learned (held-out loss ln 4); the letter is only learnable once the
    model has seen many questions whose options it can match against what it recognises.

    ``position``: also every uniquely described object's quadrant, asked plainly and as multiple
    choice (the object -> quadrant direction was the weakest VQA category of run 8: 0.715)."""
    qa, target = [], rng.choice(objects)
    for attr, universe in (("color", list(COLORS)), ("shape", list(SHAPES))):
        truth = getattr(target, attr)
        qa.append(_mc(rng, f"mc_{attr}", f"What {attr} is the object in the {target.position}?", truth,
                      [v for v in universe if v != truth]))
    qa.append(_mc(rng, "mc_count", "How many objects are in the image?", str(len(objects)),
                  [str(k) for k in range(1, 5) if k != len(objects)]))
    if position:
        for o in objects:
            if sum(p.color == o.color and p.shape == o.shape for p in objects) == 1:
                question = f"Where is the {o.color} {o.shape}?"
                qa.append({"type": "position", "question": question, "answer": o.position})
                qa.append(_mc(rng, "mc_position", question, o.position, [c for c in CELLS.values() if c != o.position]))
    return qa


def _mc(rng: random.Random, qtype: str, question: str, truth: str, others: list[str]) -> dict:
    options = [truth] + rng.sample(others, min(3, len(others)))
    rng.shuffle(options)
    letters = "ABCD"[: len(options)]
    body = "\n".join(f"{letter}. {opt}" for letter, opt in zip(letters, options))
    return {"type": qtype, "question": f"{question}\n{body}\n{MC_SUFFIX}", "answer": letters[options.index(truth)],
            "options": options}


def _record(rid, scene: Scene, image_rel, task, source, turns, **meta) -> dict:
    return {"id": rid, "image": [image_rel], "conversations": turns, "task": task, "source": source,
            "split": scene.split, "meta": {"scene": scene.id, **meta}}


def scene_records(scene: Scene, image_rel: str, rng: random.Random, views: bool = False,
                  position_drill: bool = False) -> list[dict]:
    """A scene's records; ``views`` and ``position_drill`` add training records (see
    ``synthesize``), never validation or test ones."""
    img = IMAGE_PLACEHOLDER
    out = [_record(f"{scene.id}-cap", scene, image_rel, "understanding", "synth-caption",
                   [{"from": "human", "value": f"{img}\nDescribe the image."},
                    {"from": "gpt", "value": caption(scene.objects)}])]
    qa = questions(rng, scene.objects)
    for i, q in enumerate(qa):
        out.append(_record(f"{scene.id}-vqa{i}", scene, image_rel, "understanding", "synth-vqa",
                           [{"from": "human", "value": f"{img}\n{q['question']}"},
                            {"from": "gpt", "value": q["answer"]}],
                           qtype=q["type"], answer=q["answer"], **({"options": q["options"]} if "options" in q else {})))
    fine = scene.category in FINE_GRAINED
    out.append(_record(f"{scene.id}-t2i", scene, image_rel, "generation", "synth-t2i-fine" if fine else "synth-t2i",
                       [{"from": "human", "value": T2I_TEMPLATE.format(prompt=scene.prompt)},
                        {"from": "gpt", "value": img}],
                       category=scene.category, prompt=scene.prompt))
    turns = [{"from": "human", "value": f"{img}\n{qa[0]['question']}"}, {"from": "gpt", "value": qa[0]["answer"]}]
    for q in qa[1:3]:
        turns += [{"from": "human", "value": q["question"]}, {"from": "gpt", "value": q["answer"]}]
    turns += [{"from": "human", "value": "Describe the whole picture."}, {"from": "gpt", "value": caption(scene.objects)}]
    out.append(_record(f"{scene.id}-dlg", scene, image_rel, "understanding", "synth-dialogue", turns))
    if scene.split == "train":  # its own generator: the scene stream and the test split stay as they were
        drill = random.Random(f"{scene.id}-mc")
        asked = {q["question"] for q in qa}  # the validator rejects a repeated conversation as a duplicate
        for i, q in enumerate(q for q in mc_drill(drill, scene.objects, position_drill) if q["question"] not in asked):
            source = "synth-mc" if "options" in q else "synth-vqa"
            out.append(_record(f"{scene.id}-mc{i}", scene, image_rel, "understanding", source,
                               [{"from": "human", "value": f"{img}\n{q['question']}"},
                                {"from": "gpt", "value": q["answer"]}],
                               qtype=q["type"], answer=q["answer"],
                               **({"options": q["options"]} if "options" in q else {})))
        if views:
            for category, prompt in t2i_views(scene.category, scene.objects):
                out.append(_record(f"{scene.id}-t2i-{category}", scene, image_rel, "generation",
                                   "synth-t2i-fine" if category in FINE_GRAINED else "synth-t2i",
                                   [{"from": "human", "value": T2I_TEMPLATE.format(prompt=prompt)},
                                    {"from": "gpt", "value": img}],
                                   category=category, prompt=prompt))
    return out


def synthesize(out: str | Path, n: int, size: int = 64, seed: int = 0, progress=None, workers: int | None = None,
               views: bool = False, position_drill: bool = False) -> dict:
    """Write ``n`` scenes and their records under ``out``; returns counts.

    Training scenes only, and off by default (the demo's data stay as they were): ``views`` adds a
    generation record for every other category's prompt that is exactly true of the scene
    (``t2i_views``: each image teaches the text condition in up to four phrasings);
    ``position_drill`` asks every uniquely described object's quadrant, plainly and as multiple
    choice. Validation and test records are the same either way.

    Scenes are drawn in order from one seeded generator; only the rendering (the cost) is
    spread over ``workers`` threads (default: the CPU count, at most 8), so the files are
    byte-identical whatever the number of workers.

    Raises:
        ValueError: ``n`` < 1, ``size`` < 32 or ``workers`` < 1.
    """
    if n < 1:
        raise ValueError(f"--n {n}: need at least one scene")
    if size < 32:
        raise ValueError(f"--size {size}: shapes need at least 32 px")
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"--workers {workers}: use 1 or more")
    out = Path(out)
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    for split, _ in SPLITS:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[Path, list[ShapeObject], int]] = []
    with open(out / "manifest.jsonl.tmp", "w") as manifest, open(out / "scenes.jsonl.tmp", "w") as scenes_file:
        for i in range(n):
            category = CATEGORIES[i % len(CATEGORIES)]  # balanced categories
            objects = _sample_objects(rng, category)
            split = _split(rng.random())
            scene = Scene(f"s{i:06d}", split, category, objects, t2i_prompt(category, objects))
            rel = f"images/{split}/{scene.id}.png"
            jobs.append((out / rel, objects, size))
            for rec in scene_records(scene, rel, rng, views, position_drill):
                manifest.write(json.dumps(rec, sort_keys=True) + "\n")
                counts[rec["source"]] = counts.get(rec["source"], 0) + 1
            scenes_file.write(json.dumps({"id": scene.id, "split": split, "category": category, "prompt": scene.prompt,
                                          "image": rel, "size": size,
                                          "objects": [o.to_dict() for o in objects]}, sort_keys=True) + "\n")
    _render_all(jobs, workers, progress)
    (out / "manifest.jsonl.tmp").rename(out / "manifest.jsonl")
    (out / "scenes.jsonl.tmp").rename(out / "scenes.jsonl")
    return {"scenes": n, "records": sum(counts.values()), **counts}


def _render_to(job: tuple[Path, list[ShapeObject], int]) -> None:
    path, objects, size = job
    render(objects, size).save(path, optimize=False)


def _render_all(jobs: list, workers: int, progress) -> None:
    """Render every scene; Pillow's resize and PNG encoder release the GIL, so threads scale."""
    with ThreadPoolExecutor(workers) as pool:
        for i, _ in enumerate(pool.map(_render_to, jobs) if workers > 1 else map(_render_to, jobs)):
            if progress:
                progress(i + 1, len(jobs))


def _split(u: float) -> str:
    acc = 0.0
    for name, frac in SPLITS:
        acc += frac
        if u < acc:
            return name
    return SPLITS[-1][0]


def load_scenes(path: str | Path, split: str | None = None) -> list[dict]:
    """Scene annotations (objects as ``ShapeObject``) from ``scenes.jsonl``."""
    scenes = []
    for line in Path(path).read_text().splitlines():
        s = json.loads(line)
        if split is None or s["split"] == split:
            s["objects"] = [ShapeObject(**o) for o in s["objects"]]
            scenes.append(s)
    return scenes
