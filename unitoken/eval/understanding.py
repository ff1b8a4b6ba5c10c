"""Understanding suites: ``shapes-vqa`` and MMBench/SEED/MMStar-style multiple choice.

Every item is asked with greedy decoding (the paper's setting) and scored 0/1, so the gate
can pair items between two models. ``shapes-vqa`` reads the synthetic test split: exact match
for open questions (colour, shape, count, position) and option-letter accuracy for multiple
choice. Multiple-choice files (JSONL: ``question``, ``options`` {letter: text} or list,
``answer`` letter, ``image`` path, optional ``category``) are scored by letter, optionally with
circular evaluation (every rotation of the options must be answered correctly).
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

from PIL import Image

from unitoken.data.manifest import load_records, resolve_image
from unitoken.data.shapes import CELLS, COLORS, SHAPES

# Size of the answer space of each open shapes-vqa question type (for the chance level).
ANSWER_SPACE = {"color": len(COLORS), "shape": len(SHAPES), "count": 4, "position": len(CELLS)}
MC_PROMPT = "Answer with the option's letter from the given choices directly."


def normalize(text: str) -> str:
    text = text.strip().lower()
    text = text.translate(str.maketrans("", "", string.punctuation))
    words = {"one": "1", "two": "2", "three": "3", "four": "4"}
    return " ".join(words.get(w, w) for w in text.split() if w not in ("a", "an", "the"))


def extract_letter(answer: str, letters: str) -> str | None:
    """The option letter a free-text answer commits to (``B``, ``B.``, ``(B) red``...)."""
    m = re.match(rf"\s*\(?([{letters}])\b", answer.strip().upper())
    return m.group(1) if m else None


def shapes_vqa_items(data_dir: Path, limit: int | None = None, split: str = "test") -> list[dict]:
    """Questions of the synthetic split with their answers (one image each)."""
    manifest = Path(data_dir) / "manifest.jsonl"
    if not manifest.is_file():
        raise FileNotFoundError(f"{data_dir}: no manifest.jsonl; create the data with `unitoken data synth`")
    items = []
    for rec in load_records(manifest):
        if rec.get("source") != "synth-vqa" or rec.get("split") != split:
            continue
        q = rec["conversations"][0]["value"]
        items.append({"id": rec["id"], "image": str(resolve_image(rec["image"][0], manifest.parent)),
                      "prompt": q, "answer": rec["meta"]["answer"], "category": rec["meta"]["qtype"],
                      "multiple_choice": rec["meta"]["qtype"].startswith("mc_"),
                      "letters": "ABCD"[: len(rec["meta"].get("options", []))],
                      "n_choices": len(rec["meta"].get("options", [])) or ANSWER_SPACE[rec["meta"]["qtype"]]})
    return items[:limit] if limit else items


def mc_file_items(path: Path, circular: bool = False, limit: int | None = None) -> list[dict]:
    """Items of an MMBench/SEED/MMStar-style JSONL file (images relative to the file)."""
    path = Path(path)
    items = []
    for rec in load_records(path):
        options = rec["options"]
        texts = list(options.values()) if isinstance(options, dict) else list(options)
        letters = "ABCDEFGH"[: len(texts)]
        truth = texts[letters.index(rec["answer"].strip().upper())]
        rotations = range(len(texts)) if circular else range(1)
        for r in rotations:
            rotated = texts[r:] + texts[:r]
            body = "\n".join(f"{letter}. {t}" for letter, t in zip(letters, rotated))
            items.append({"id": f"{rec.get('id', len(items))}" + (f"@{r}" if circular else ""),
                          "group": str(rec.get("id", len(items))), "category": rec.get("category", "all"),
                          "image": str(resolve_image(rec["image"], path.parent)),
                          "prompt": f"<|image|>\n{rec['question']}\n{body}\n{MC_PROMPT}",
                          "answer": letters[rotated.index(truth)], "multiple_choice": True, "letters": letters,
                          "n_choices": len(letters)})
        if limit and len({i["group"] for i in items}) >= limit:
            break
    return items


def score(item: dict, answer: str) -> float:
    if item["multiple_choice"]:
        return float(extract_letter(answer, item["letters"]) == item["answer"])
    return float(normalize(answer) == normalize(item["answer"]))


def run_understanding(model, builder, items: list[dict], max_new_tokens: int = 12, batch_size: int = 64,
                      progress=None) -> list[dict]:
    """Answer every item greedily (``batch_size`` items per forward pass; the answers are those
    of one item at a time) -> per-item results {id, category, answer, prediction, score}."""
    from unitoken.model.generation import generate_text_batch

    results = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        images = []
        for item in chunk:
            with Image.open(item["image"]) as im:
                images.append([im.convert("RGB")])
        predictions = generate_text_batch(model, builder, [i["prompt"] for i in chunk], images,
                                          max_new_tokens=max_new_tokens)
        for item, prediction in zip(chunk, predictions):
            results.append({"id": item["id"], "category": item["category"], "group": item.get("group", item["id"]),
                            "answer": item["answer"], "prediction": prediction, "score": score(item, prediction)})
        if progress:
            progress(len(results), len(items))
    return circular_collapse(results)


def circular_collapse(results: list[dict]) -> list[dict]:
    """Circular evaluation: a question counts only if every rotation was right."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["group"], []).append(r)
    if all(len(g) == 1 for g in groups.values()):
        return results
    return [{**g[0], "id": key, "score": float(all(r["score"] == 1.0 for r in g)),
             "prediction": json.dumps([r["prediction"] for r in g])} for key, g in groups.items()]


def chance_level(items: list[dict]) -> float:
    """Expected accuracy of a uniform guess within each question's answer space."""
    if not items:
        return 0.0
    return sum(1 / i["n_choices"] for i in items) / len(items)
