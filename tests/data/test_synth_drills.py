"""The synthetic set's extra training records (issue 36): every true prompt of a training image
(``views``) and the position drill. Off by default; validation and test records never change."""

from __future__ import annotations

import json

import pytest

from unitoken.data.shapes import CELLS
from unitoken.data.synth import load_scenes, relation, synthesize, t2i_views


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    plain = synthesize(d / "plain", 60, workers=1)
    rich = synthesize(d / "rich", 60, workers=1, views=True, position_drill=True)
    read = {k: [json.loads(line) for line in (d / k / "manifest.jsonl").read_text().splitlines()]
            for k in ("plain", "rich")}
    return d, plain, rich, read


def test_defaults_unchanged_and_held_out_records_identical(sets):
    d, plain, rich, read = sets
    assert (d / "plain" / "scenes.jsonl").read_bytes() == (d / "rich" / "scenes.jsonl").read_bytes()
    by_id = {r["id"]: r for r in read["rich"]}
    assert all(by_id[r["id"]] == r for r in read["plain"])  # every default record, unchanged
    extra = [r for r in read["rich"] if r["id"] not in {p["id"] for p in read["plain"]}]
    assert extra and {r["split"] for r in extra} == {"train"}
    assert rich["records"] == plain["records"] + len(extra)


def test_every_view_is_true_of_its_scene(sets):
    d, _, _, read = sets
    scenes = {s["id"]: s for s in load_scenes(d / "rich" / "scenes.jsonl")}
    views = [r for r in read["rich"] if "-t2i-" in r["id"]]
    assert {r["meta"]["category"] for r in views} >= {"full", "single_object", "colors", "two_objects", "color_attr"}
    for r in views:
        objects = scenes[r["meta"]["scene"]]["objects"]
        prompt, cat = r["meta"]["prompt"], r["meta"]["category"]
        assert prompt in r["conversations"][0]["value"] and r["meta"]["category"] != scenes[r["meta"]["scene"]]["category"]
        named = [o.shape for o in objects if o.shape in prompt]
        if cat in ("single_object", "colors"):
            assert len(objects) == 1 and named
        if cat in ("two_objects", "color_attr", "position"):
            assert len(objects) == 2 and all(o.shape in prompt for o in objects)
        if cat == "color_attr":
            assert all(f"{o.color} {o.shape}" in prompt for o in objects)
        if cat == "position":
            assert relation(objects[0], objects[1]) in prompt
        if cat == "counting":
            assert len({o.shape for o in objects}) == 1 and len(objects) >= 2


def test_views_by_object_layout():
    from unitoken.data.shapes import ShapeObject

    def o(shape, color, row, col):
        return ShapeObject(shape, color, "small", row, col, 0.0, 0.0)

    one = [o("circle", "red", 0, 0)]
    assert dict(t2i_views("single_object", one)) == {"full": "There is a small red circle in the top left.",
                                                     "colors": "a red circle"}
    two = [o("circle", "red", 0, 0), o("square", "blue", 0, 1)]
    assert dict(t2i_views("two_objects", two))["position"] == "a circle left of a square"
    assert "counting" not in dict(t2i_views("full", two))
    same = [o("square", "red", 0, 0), o("square", "blue", 1, 1), o("square", "red", 1, 0)]
    assert dict(t2i_views("full", same)) == {"counting": "three squares"}


def test_position_drill_asks_each_unique_object(sets):
    d, _, _, read = sets
    scenes = {s["id"]: s for s in load_scenes(d / "rich" / "scenes.jsonl")}
    mc = [r for r in read["rich"] if r["meta"].get("qtype") == "mc_position"]
    plain = [r for r in read["rich"] if r["meta"].get("qtype") == "position" and "-mc" in r["id"]]
    assert mc and plain and all(r["source"] == "synth-mc" for r in mc) and all(r["source"] == "synth-vqa" for r in plain)
    for r in mc:
        options, answer = r["meta"]["options"], r["meta"]["answer"]
        assert sorted(options) == sorted(CELLS.values())
        truth = options["ABCD".index(answer)]
        color, shape = r["conversations"][0]["value"].split("Where is the ")[1].split("?")[0].split()
        assert [x.position for x in scenes[r["meta"]["scene"]]["objects"] if (x.color, x.shape) == (color, shape)] == [truth]
    # no conversation twice for one image (the validator would reject it as a duplicate)
    keys = [(r["image"][0], json.dumps(r["conversations"])) for r in read["rich"]]
    assert len(keys) == len(set(keys))
