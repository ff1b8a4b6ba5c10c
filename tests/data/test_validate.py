"""Manifest validation: reasons, quarantine, the clean + rejected == input invariant."""

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unitoken.data.synth import synthesize
from unitoken.data.validate import validate_manifest


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    synthesize(d, 40, size=64, seed=3)
    return d


def _row(image="images/train/x.png", **kw):
    rec = {"id": "r", "image": [image], "task": "understanding", "source": "t", "split": "train",
           "conversations": [{"from": "human", "value": "<|image|>\nWhat?"}, {"from": "gpt", "value": "red"}]}
    rec.update(kw)
    return json.dumps(rec)


def test_synthetic_data_is_clean(synth, tmp_path):
    res = validate_manifest(synth / "manifest.jsonl", tmp_path / "v")
    assert res.rejected_rows == 0 and res.clean_rows == res.input_rows > 0
    assert (tmp_path / "v" / "clean.jsonl").read_text() == (synth / "manifest.jsonl").read_text()
    assert all(e["success"] for e in res.expectations) and len(res.expectations) == 12


def test_broken_rows_are_quarantined_with_the_right_reason(synth, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(synth, d)
    good = (d / "manifest.jsonl").read_text().splitlines()
    img = json.loads(good[0])["image"][0]
    (d / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)
    broken = {
        "image:missing": _row("images/nope.png"),
        "image:undecodable": _row("images/corrupt.png"),
        "placeholder_mismatch": _row(img, conversations=[{"from": "human", "value": "<|image|><|image|>?"},
                                                         {"from": "gpt", "value": "x"}]),
        "role:unknown": _row(img, conversations=[{"from": "human", "value": "<|image|>?"},
                                                 {"from": "robot", "value": "x"}]),
        "image:escapes_root": _row("../../etc/passwd"),
        "duplicate": good[1],
        "task:unknown": _row(img, task="painting"),
        "turn:empty": _row(img, conversations=[{"from": "human", "value": "<|image|>?"}, {"from": "gpt", "value": "  "}]),
        "parse:invalid_json": '{"id": "half a row", ',
        "schema:conversations": json.dumps({"id": "no-conv", "image": [img], "task": "understanding"}),
    }
    with open(d / "manifest.jsonl", "a") as fh:
        for line in broken.values():
            fh.write(line + "\n")
    res = validate_manifest(d / "manifest.jsonl", tmp_path / "v")
    rejected = [json.loads(x) for x in (tmp_path / "v" / "rejected.jsonl").read_text().splitlines()]
    by_raw = {r["raw"]: r["reasons"] for r in rejected}
    for reason, line in broken.items():
        assert by_raw[line] == [reason], (reason, by_raw.get(line))
    assert res.rejected_rows == len(broken) and res.clean_rows == len(good)
    assert res.clean_rows + res.rejected_rows == res.input_rows == len(good) + len(broken)
    report = json.loads((tmp_path / "v" / "report.json").read_text())
    assert report["reasons"] == {reason: 1 for reason in broken}
    assert (tmp_path / "v" / "report.html").read_text().count("<tr") > len(broken)


def test_cli_exit_code_3_over_threshold(synth, tmp_path):
    from unitoken.cli import main

    d = tmp_path / "d"
    shutil.copytree(synth, d)
    with open(d / "manifest.jsonl", "a") as fh:
        for i in range(5):  # 5 of 325 rows = 1.5 % > the default 1 %
            fh.write(_row(f"images/nope{i}.png") + "\n")
    assert main(["data", "validate", str(d / "manifest.jsonl"), "--out", str(tmp_path / "v")]) == 3
    assert main(["data", "validate", str(d / "manifest.jsonl"), "--out", str(tmp_path / "v2"),
                 "--max-reject-fraction", "0.5"]) == 0


def test_json_list_manifest_is_read(synth, tmp_path):
    rows = [json.loads(x) for x in (synth / "manifest.jsonl").read_text().splitlines()[:5]]
    (synth / "list.json").write_text(json.dumps(rows + ["not a record"]))
    res = validate_manifest(synth / "list.json", tmp_path / "v")
    assert (res.clean_rows, res.rejected_rows) == (5, 1)
    assert res.reasons == {"parse:not_an_object": 1}


def test_huge_image_refused_before_decoding(tmp_path):
    """A decompression bomb (huge declared size) is rejected from its header."""
    from PIL import Image

    Image.new("1", (9000, 9000)).save(tmp_path / "bomb.png")  # tiny file, 81 MP declared
    (tmp_path / "m.jsonl").write_text(_row("bomb.png") + "\n")
    res = validate_manifest(tmp_path / "m.jsonl", tmp_path / "v")
    assert res.reasons == {"image:too_large": 1}


_line = st.one_of(
    st.builds(lambda s: _row("ok.png", id=s), st.text(max_size=5)),
    st.builds(lambda s: _row("missing.png", id=s), st.text(max_size=5)),
    st.builds(lambda n: _row("ok.png", conversations=[{"from": "human", "value": "<|image|>" * n},
                                                      {"from": "gpt", "value": "x"}]), st.integers(0, 3)),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"),
            max_size=30),
    st.sampled_from(["{}", "[]", "null", '{"conversations": []}', _row("../x.png")]),
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_line, max_size=25))
def test_validation_never_loses_or_duplicates_rows(tmp_path_factory, lines):
    """Property: the multiset of clean rows + rejected raws equals the input rows, in order."""
    from PIL import Image

    d = tmp_path_factory.mktemp("prop")
    Image.new("RGB", (32, 32)).save(d / "ok.png")
    (d / "m.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    res = validate_manifest(d / "m.jsonl", d / "v")
    clean = (d / "v" / "clean.jsonl").read_text(encoding="utf-8").split("\n")[:-1]
    rejected = [json.loads(x) for x in (d / "v" / "rejected.jsonl").read_text(encoding="utf-8").split("\n")[:-1]]
    assert res.input_rows == len(lines) == len(clean) + len(rejected)
    assert sorted(clean + [r["raw"] for r in rejected]) == sorted(lines)
    assert sorted(r["line"] for r in rejected) == sorted(set(r["line"] for r in rejected))
    assert all(r["reasons"] for r in rejected)


def test_synth_files_do_not_depend_on_the_number_of_rendering_threads(tmp_path):
    def files(d):
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    one, four = tmp_path / "one", tmp_path / "four"
    synthesize(one, 30, size=64, seed=4, workers=1)
    synthesize(four, 30, size=64, seed=4, workers=4)
    assert files(one) == files(four) and len(files(one)) == 32  # 30 images + manifest + scenes
    with pytest.raises(ValueError, match="--workers 0"):
        synthesize(tmp_path / "zero", 3, workers=0)


def test_chunks_find_duplicates_across_them_and_keep_every_row(synth, tmp_path):
    """With 3-row chunks a duplicate whose original is in an earlier chunk is still rejected, every row
    lands once (clean + rejected == input), and the files equal those of one big chunk (images
    checked on 3 threads there, on 1 here)."""
    d = tmp_path / "d"
    shutil.copytree(synth, d)
    good = (d / "manifest.jsonl").read_text().splitlines()[:8]
    lines = good[:4] + [_row("images/nope.png"), good[0]] + good[4:] + ['{"half', good[5]]
    (d / "m.jsonl").write_text("".join(x + "\n" for x in lines))
    res = validate_manifest(d / "m.jsonl", tmp_path / "small", chunk_rows=3, image_workers=1)
    rejected = [json.loads(x) for x in (tmp_path / "small" / "rejected.jsonl").read_text().splitlines()]
    assert {r["line"]: r["reasons"] for r in rejected} == {5: ["image:missing"], 6: ["duplicate"],
                                                           11: ["parse:invalid_json"], 12: ["duplicate"]}
    clean = (tmp_path / "small" / "clean.jsonl").read_text().splitlines()
    assert res.input_rows == len(lines) == len(clean) + len(rejected) and clean == good
    assert sorted(clean + [r["raw"] for r in rejected]) == sorted(lines)
    validate_manifest(d / "m.jsonl", tmp_path / "big", image_workers=3)
    for name in ("clean.jsonl", "rejected.jsonl", "report.json", "report.html"):
        assert (tmp_path / "small" / name).read_bytes() == (tmp_path / "big" / name).read_bytes(), name
    with pytest.raises(ValueError, match="chunk_rows=0"):
        validate_manifest(d / "m.jsonl", tmp_path / "zero", chunk_rows=0)
