"""The data commands as the issue's acceptance runs them (in-process CLI calls)."""

import hashlib
import json

from unitoken.cli import main


def _tree_digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_synth_500_validates_clean_then_broken_rows_exit_3(tmp_path):
    d, v = tmp_path / "d", tmp_path / "v"
    assert main(["data", "synth", "--out", str(d), "--n", "500"]) == 0
    assert main(["data", "validate", str(d / "manifest.jsonl"), "--out", str(v)]) == 0
    report = json.loads((v / "report.json").read_text())
    assert report["rejected_rows"] == 0 and report["clean_rows"] == report["input_rows"] > 3000
    assert (v / "report.json.sha256").read_text().split()[0] == hashlib.sha256((v / "report.json").read_bytes()).hexdigest()

    good = (d / "manifest.jsonl").read_text().splitlines()
    rec = json.loads(good[0])
    (d / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    broken = []
    for i in range(60):  # 60 of ~5,100 rows: over the default 1 %
        r = dict(rec, id=f"bad{i}")
        kind = i % 6
        if kind == 0:
            r["image"] = [f"images/missing{i}.png"]
        elif kind == 1:
            r["image"] = ["images/corrupt.png"]
            r["conversations"] = [dict(r["conversations"][0], value=f"<|image|> {i}"), r["conversations"][1]]
        elif kind == 2:
            r["conversations"] = [{"from": "human", "value": f"no image here {i}"}, r["conversations"][1]]
        elif kind == 3:
            r["conversations"] = [r["conversations"][0], {"from": "assistant", "value": f"{i}"}]
        elif kind == 4:
            r["image"] = [f"../outside{i}.png"]
        else:
            r = json.loads(good[i])
        broken.append((kind, json.dumps(r)))
    with open(d / "manifest.jsonl", "a") as fh:
        fh.writelines(line + "\n" for _, line in broken)
    assert main(["data", "validate", str(d / "manifest.jsonl"), "--out", str(v)]) == 3
    rejected = {json.loads(x)["raw"]: json.loads(x)["reasons"] for x in (v / "rejected.jsonl").read_text().splitlines()}
    expected = {0: ["image:missing"], 1: ["image:undecodable"], 2: ["placeholder_mismatch"], 3: ["role:unknown"],
                4: ["image:escapes_root"], 5: ["duplicate"]}
    for kind, line in broken:
        assert rejected[line] == expected[kind]
    clean = (v / "clean.jsonl").read_text().splitlines()
    assert len(clean) + len(rejected) == len(good) + len(broken) and clean == good


def test_synth_is_deterministic(tmp_path):
    for name in ("a", "b"):
        assert main(["data", "synth", "--out", str(tmp_path / name), "--n", "30", "--seed", "4"]) == 0
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    assert main(["data", "synth", "--out", str(tmp_path / "c"), "--n", "30", "--seed", "5"]) == 0
    assert _tree_digest(tmp_path / "a") != _tree_digest(tmp_path / "c")


def test_synth_content_matches_its_annotations(tmp_path):
    """Every rendered scene is read back correctly by the detector; answers agree with objects."""
    from PIL import Image

    from unitoken.data.shapes import recognised
    from unitoken.data.synth import load_scenes

    assert main(["data", "synth", "--out", str(tmp_path), "--n", "60"]) == 0
    scenes = load_scenes(tmp_path / "scenes.jsonl")
    assert {s["category"] for s in scenes} == {"single_object", "two_objects", "counting", "colors", "position",
                                               "color_attr", "full"}
    assert {s["split"] for s in scenes} == {"train", "val", "test"}
    for s in scenes:
        with Image.open(tmp_path / s["image"]) as im:
            assert all(recognised(s["objects"], im))
    by_scene = {s["id"]: s for s in scenes}
    for line in (tmp_path / "manifest.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["meta"].get("qtype") == "count":
            assert r["meta"]["answer"] == str(len(by_scene[r["meta"]["scene"]]["objects"]))


def test_multiple_choice_drill_is_only_in_training_scenes_and_answers_right(tmp_path):
    """The extra multiple-choice questions (source synth-mc) belong to training scenes only, so the
    test split is what it was; each answer letter points at the option that is the truth."""
    from unitoken.data.synth import load_scenes

    assert main(["data", "synth", "--out", str(tmp_path), "--n", "80"]) == 0
    records = [json.loads(x) for x in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    scenes = {s["id"]: s for s in load_scenes(tmp_path / "scenes.jsonl")}
    drill = [r for r in records if r["source"] == "synth-mc"]
    assert drill and {r["split"] for r in drill} == {"train"}
    per_scene = {}
    for r in drill:
        per_scene[r["meta"]["scene"]] = per_scene.get(r["meta"]["scene"], 0) + 1
        objects = scenes[r["meta"]["scene"]]["objects"]
        truth = r["meta"]["options"]["ABCD".index(r["meta"]["answer"])]
        if r["meta"]["qtype"] == "mc_count":
            assert truth == str(len(objects))
        else:
            attr = r["meta"]["qtype"].removeprefix("mc_")
            position = r["conversations"][0]["value"].split("in the ")[1].split("?")[0]
            assert truth == getattr(next(o for o in objects if o.position == position), attr)
    assert max(per_scene.values()) <= 3
