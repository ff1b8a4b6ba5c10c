"""Evaluation suites and the two-track gate."""

import json

import pytest
from PIL import Image

from tests.conftest import build_tiny
from unitoken.cli import main
from unitoken.data.synth import synthesize
from unitoken.eval.gate import GatePolicy, decide
from unitoken.eval.generation import ShapesDetector, check, geneval_items, shapes_geneval_items
from unitoken.eval.understanding import extract_letter, normalize
from unitoken.model.io import save_model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("evdata")
    synthesize(d, 300, seed=11)
    return d


def test_detector_scores_ground_truth_test_images(data):
    """The GenEval-style checks pass on the rendered ground truth of the test split (>= 99 %)."""
    items = shapes_geneval_items(data)
    assert len({i["category"] for i in items}) == 7
    detector = ShapesDetector()
    scores = []
    for item in items:
        with Image.open(item["reference"]) as im:
            ok, reason = check(item["include"], detector(im.convert("RGB")))
        scores.append(ok)
    assert sum(scores) / len(scores) >= 0.99, f"{sum(scores)}/{len(scores)}"


def test_detector_sees_no_objects_in_noise_or_blobs():
    """Random pixels, irregular blobs and two merged shapes are not objects (chance stays near 0)."""
    import numpy as np
    from PIL import ImageDraw

    from unitoken.data.shapes import COLORS, ShapeObject, detect, render

    rng = np.random.default_rng(0)
    noise = [Image.fromarray((rng.random((128, 128, 3)) * 255).astype("uint8")) for _ in range(20)]
    assert sum(len(detect(im)) for im in noise) == 0
    blob = Image.new("RGB", (128, 128), (245, 245, 245))
    ImageDraw.Draw(blob).polygon([(10, 10), (60, 20), (40, 40), (70, 70), (15, 55)], fill=COLORS["red"])
    assert detect(blob) == []
    merged = render([ShapeObject("square", "blue", "large", 0, 0)], 128)
    ImageDraw.Draw(merged).ellipse((30, 30, 90, 90), fill=COLORS["blue"])
    assert detect(merged) == []
    speckled = np.asarray(render([ShapeObject("circle", "green", "large", 1, 1)], 128)).copy()
    speckled[64:, 64:] = np.where(rng.random((64, 64, 1)) < 0.5, speckled[64:, 64:], 30)
    assert detect(Image.fromarray(speckled)) == []  # right outline, not one colour


def test_checks_explain_failures(data):
    item = next(i for i in shapes_geneval_items(data) if i["category"] == "counting")
    blank = Image.new("RGB", (64, 64), (245, 245, 245))
    ok, reason = check(item["include"], ShapesDetector()(blank))
    assert not ok and reason.startswith("expected") and "found 0" in reason


def test_answer_normalisation():
    assert normalize(" Two.") == "2" and normalize("the Top left") == "top left"
    assert extract_letter("B. red", "ABCD") == "B" and extract_letter("(C)", "ABC") == "C"
    assert extract_letter("red", "ABCD") is None


def test_geneval_metadata_loader(tmp_path):
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text(json.dumps({"tag": "counting", "include": [{"class": "circle", "count": 3}],
                                "prompt": "a photo of three circles"}) + "\n" + json.dumps(
        {"tag": "position", "include": [{"class": "square", "count": 1},
                                        {"class": "circle", "count": 1, "position": ["left of", 0]}],
         "prompt": "a photo of a circle left of a square"}) + "\n")
    items = geneval_items(meta)
    assert items[0]["include"][0]["exact"] and items[1]["include"][1]["position"] == ("left of", 0)


def test_random_tiny_model_is_at_chance(data, tmp_path):
    """An untrained model answers and draws at (or below) chance; the report files exist."""
    model, tok, _ = build_tiny()
    save_model(model, tok, tmp_path / "m")
    assert main(["eval", "--model", str(tmp_path / "m"), "--suite", "shapes-vqa,shapes-geneval", "--data", str(data),
                 "--out", str(tmp_path / "e"), "--limit", "8", "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    vqa, gen = report["suites"]["shapes-vqa"], report["suites"]["shapes-geneval"]
    assert vqa["n"] == 8 and gen["n"] == 8
    assert vqa["overall"] <= vqa["chance"] + 0.1 and gen["overall"] <= 0.1
    items = (tmp_path / "e" / "items.jsonl").read_text().splitlines()
    assert len(items) == 16
    html = (tmp_path / "e" / "report.html").read_text()
    assert html.count("<figure") == 8 and "data:image/png;base64," in html
    assert all((tmp_path / "e" / json.loads(x)["image"]).is_file() for x in items if '"image"' in x)


def _fake_eval(root, und_scores, gen_scores):
    """An evaluation directory with the given per-item scores (as `unitoken eval` writes it)."""
    root.mkdir(parents=True, exist_ok=True)
    items = [{"suite": "shapes-vqa", "task": "understanding", "id": f"q{i}", "category": "color", "score": s}
             for i, s in enumerate(und_scores)]
    items += [{"suite": "shapes-geneval", "task": "generation", "id": f"g{i}", "category": "colors", "score": s}
              for i, s in enumerate(gen_scores)]
    metrics = {"shapes-vqa/overall": sum(und_scores) / len(und_scores),
               "shapes-geneval/overall": sum(gen_scores) / len(gen_scores)}
    (root / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (root / "report.json").write_text(json.dumps({"metrics": metrics, "suites": {}, "settings": {}}))
    return root


def test_gate_passes_candidate_against_itself_with_margin_zero(tmp_path):
    ev = _fake_eval(tmp_path / "e", [1, 0, 1, 1, 0] * 20, [1, 1, 0, 0, 1] * 20)
    policy = tmp_path / "p.yaml"
    policy.write_text("margins: {understanding: 0, generation: 0}\n")
    assert main(["gate", "--candidate", str(ev), "--champion", str(ev), "--policy", str(policy),
                 "--out", str(tmp_path / "d.json")]) == 0
    decision = json.loads((tmp_path / "d.json").read_text())
    assert decision["passed"] and {c["check"] for c in decision["checks"]} == {"non_inferiority", "improvement"}


def test_gate_fails_when_generation_degrades_while_understanding_improves(tmp_path):
    champ = _fake_eval(tmp_path / "champ", [1, 0, 1, 0] * 25, [1, 1, 1, 0] * 25)
    cand = _fake_eval(tmp_path / "cand", [1, 1, 1, 0] * 25, [1, 0, 0, 0] * 25)
    assert main(["gate", "--candidate", str(cand), "--champion", str(champ), "--out", str(tmp_path / "d.json")]) == 3
    decision = json.loads((tmp_path / "d.json").read_text())
    by_task = {c.get("task"): c for c in decision["checks"] if c["check"] == "non_inferiority"}
    assert by_task["understanding"]["passed"] and by_task["understanding"]["mean_diff"] == pytest.approx(0.25)
    gen = by_task["generation"]
    assert not gen["passed"] and gen["mean_diff"] == pytest.approx(-0.5) and gen["ci"][1] < 0
    assert decision["reasons"] == [gen["reason"]] and "generation" in gen["reason"] and "below margin" in gen["reason"]


def test_gate_floors_alone_without_champion(tmp_path):
    ev = _fake_eval(tmp_path / "e", [1, 0] * 10, [0, 0, 0, 1] * 5)
    policy = GatePolicy(floors={"shapes-vqa/overall": 0.4, "shapes-geneval/overall": 0.3})
    decision = decide(ev, None, policy)
    assert not decision["passed"]
    assert decision["reasons"] == ["shapes-geneval/overall = 0.25 < floor 0.3"]


def _vqa_eval(root, answers: list[str], truth: str = "red"):
    """An evaluation of 0/1-scored shapes-vqa answers with its report (interval, chance 1/4)."""
    from unitoken.eval.summary import summarize

    root.mkdir(parents=True, exist_ok=True)
    items = [{"suite": "shapes-vqa", "task": "understanding", "id": f"q{i}", "category": "color", "answer": truth,
              "prediction": a, "score": float(a == truth)} for i, a in enumerate(answers)]
    suite = summarize(items, "understanding", 0.25)
    (root / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (root / "report.json").write_text(json.dumps({"metrics": {"shapes-vqa/overall": suite["overall"]},
                                                  "suites": {"shapes-vqa": suite}, "settings": {}}))
    return root


def test_a_first_model_is_judged_by_its_floors_and_one_that_answers_nothing_fails_saying_so(tmp_path):
    """No champion: the recipe's floors decide. 45 right of 100 clears chance (0.25) with its
    95 % interval; empty answers fail both checks, and the reasons say the model answered nothing."""
    from unitoken.config import GateConfig

    policy = GatePolicy.from_recipe(GateConfig(floors={"shapes-vqa/overall": 0.3}, above_chance=("shapes-vqa",)))
    good = decide(_vqa_eval(tmp_path / "good", ["red"] * 45 + ["blue"] * 55), None, policy)
    assert good["passed"] and {c["check"] for c in good["checks"]} == {"floor", "above_chance"}
    above = next(c for c in good["checks"] if c["check"] == "above_chance")
    assert above["ci"][0] > 0.25 and "above chance 0.250" in above["reason"]
    silent = decide(_vqa_eval(tmp_path / "silent", [""] * 100), None, policy)
    assert not silent["passed"] and len(silent["reasons"]) == 2
    assert all("the candidate answered nothing (all 100 answers empty)" in r for r in silent["reasons"])
    lucky = decide(_vqa_eval(tmp_path / "lucky", ["red"] * 4 + ["blue"] * 8), None, policy)  # 0.33 of 12: too few
    assert [c["check"] for c in lucky["checks"] if not c["passed"]] == ["above_chance"]


def test_wilson_interval_covers_the_edges():
    """0 of 12 right is not certainty of 0; the interval stays in [0, 1] and narrows with n."""
    from unitoken.eval.summary import wilson_interval

    lo, hi = wilson_interval(0.0, 12)
    assert lo == 0.0 and 0.2 < hi < 0.3
    assert wilson_interval(1.0, 12)[1] == 1.0
    narrow, wide = wilson_interval(0.4, 400), wilson_interval(0.4, 100)
    assert wide[0] < narrow[0] < 0.4 < narrow[1] < wide[1]


def test_gate_policy_errors_name_the_field(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("margin: {generation: 0.1}\n")
    with pytest.raises(ValueError, match="unknown policy field 'margin'"):
        GatePolicy.from_yaml(bad)
    bad.write_text("margins: {speech: 0.1}\n")
    with pytest.raises(ValueError, match=r"margins\.speech: unknown task"):
        GatePolicy.from_yaml(bad)


def test_champion_model_is_evaluated_like_the_candidate(data, tmp_path):
    """`unitoken gate --champion MODEL_DIR`: the champion gets the candidate's suites, items and
    sampling settings (temperature included), so the comparison is paired and like for like."""
    model, tok, _ = build_tiny()
    save_model(model, tok, tmp_path / "m")
    assert main(["eval", "--model", str(tmp_path / "m"), "--suite", "shapes-geneval", "--data", str(data),
                 "--out", str(tmp_path / "cand"), "--limit", "3", "--device", "cpu", "--temperature", "0.7",
                 "--cfg", "2.0"]) == 0
    main(["gate", "--candidate", str(tmp_path / "cand"), "--champion", str(tmp_path / "m"),
          "--out", str(tmp_path / "d.json")])
    champ = json.loads((tmp_path / "d-champion-eval" / "report.json").read_text())
    cand = json.loads((tmp_path / "cand" / "report.json").read_text())
    assert champ["settings"] == cand["settings"] and champ["settings"]["temperature"] == 0.7
    assert list(champ["suites"]) == ["shapes-geneval"] and champ["suites"]["shapes-geneval"]["n"] == 3
    decision = json.loads((tmp_path / "d.json").read_text())
    assert any(c.get("task") == "generation" for c in decision["checks"])


def test_generation_items_list_what_the_detector_found(tmp_path, monkeypatch):
    """A failed prompt says what was drawn instead (here: the ground truth of another prompt)."""
    import torch

    import unitoken.model.generation as mg
    from unitoken.data.shapes import ShapeObject, render
    from unitoken.eval.generation import run_generation

    drawn = render([ShapeObject("square", "blue", "large", 1, 0)], 64)
    monkeypatch.setattr(mg, "generate_image_codes_batch",
                        lambda model, builder, prompts, **kw: torch.zeros(len(prompts)))
    monkeypatch.setattr(mg, "decode_images", lambda model, codes: [drawn] * len(codes))
    items = [{"id": k, "category": "single_object", "prompt": f"a {shape}", "include": [{"class": shape, "count": 1}]}
             for k, shape in (("a", "circle"), ("b", "square"))]
    fail, ok = run_generation(None, None, items, tmp_path, ShapesDetector())
    assert (fail["score"], ok["score"]) == (0.0, 1.0)
    assert fail["reason"] == "expected one circle, found 0"
    assert fail["detected"] == ok["detected"] == ["large blue square (row 1, col 0)"]


def test_cli_gate_takes_the_recipes_floors(tmp_path):
    """`unitoken gate --recipe demo` judges a first model as the pipeline's gate does: an empty
    answerer fails the demo recipe's floors (exit 3), the same report passes without floors."""
    from unitoken.cli import main

    silent = _vqa_eval(tmp_path / "silent", [""] * 100)
    assert main(["gate", "--candidate", str(silent), "--recipe", "demo", "--out", str(tmp_path / "d.json")]) == 3
    decision = json.loads((tmp_path / "d.json").read_text())
    assert any("answered nothing" in r for r in decision["reasons"])
    assert main(["gate", "--candidate", str(silent), "--out", str(tmp_path / "none.json")]) == 0
