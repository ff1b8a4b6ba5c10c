"""Fuzzing images through validation (hypothesis): truncated files, random bytes, odd modes, tiny and
huge dimensions, decompression bombs (a PNG header claiming 10^10 pixels).

Property: validation never raises; every row lands in clean or rejected (with an image:* reason),
and every image validation accepts is one the training loader can read (no "accepted, then the
pre-tokeniser crashes")."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from unitoken.data.validate import validate_manifest

EXAMPLES = int(os.environ.get("UNITOKEN_FUZZ_EXAMPLES", "25"))
MODES = ["RGB", "RGBA", "L", "LA", "P", "1", "I", "F", "CMYK", "I;16"]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb(width: int, height: int) -> bytes:
    """A valid PNG header and a tiny IDAT claiming width x height pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


@st.composite
def image_bytes(draw):
    kind = draw(st.sampled_from(["valid", "truncated", "random", "bomb", "flipped"]))
    if kind == "random":
        return kind, draw(st.binary(max_size=300))
    if kind == "bomb":
        return kind, bomb(draw(st.integers(20_000, 100_000)), draw(st.integers(20_000, 100_000)))
    mode = draw(st.sampled_from(MODES))
    size = (draw(st.integers(1, 96)), draw(st.integers(1, 96)))
    fmt = draw(st.sampled_from(["PNG", "JPEG", "BMP", "GIF", "TIFF"]))
    buf = io.BytesIO()
    try:
        Image.new(mode, size).save(buf, format=fmt)
    except (OSError, ValueError, KeyError):  # this format cannot hold this mode: store it as TIFF
        buf = io.BytesIO()
        Image.new(mode, size).save(buf, format="TIFF")
    data = buf.getvalue()
    if kind == "truncated":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if kind == "flipped" and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
    return kind, data


def _row(i: int, image: str) -> str:
    return json.dumps({"id": f"r{i}", "image": [image], "task": "understanding", "source": "fuzz", "split": "train",
                       "conversations": [{"from": "human", "value": "<|image|>\nWhat?"},
                                         {"from": "gpt", "value": f"answer {i}"}]})


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(images=st.lists(image_bytes(), min_size=1, max_size=4))
def test_any_image_is_validated_or_quarantined_never_crashes(tmp_path_factory, images):
    d = tmp_path_factory.mktemp("fuzz")
    (d / "images").mkdir()
    lines = []
    for i, (_, data) in enumerate(images):
        (d / "images" / f"{i}.img").write_bytes(data)
        lines.append(_row(i, f"images/{i}.img"))
    (d / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    res = validate_manifest(d / "manifest.jsonl", d / "v")
    assert res.clean_rows + res.rejected_rows == len(images)
    rejected = [json.loads(x) for x in (d / "v" / "rejected.jsonl").read_text().splitlines()]
    assert all(r["reasons"] and all(x.startswith("image:") for x in r["reasons"]) for r in rejected)
    for line in (d / "v" / "clean.jsonl").read_text().splitlines():
        path = d / json.loads(line)["image"][0]
        with Image.open(path) as im:  # what the pre-tokeniser does with an accepted image
            assert im.convert("RGB").size[0] >= 16
    for (kind, _), line in zip(images, lines):
        if kind in ("bomb", "random"):
            assert line not in (d / "v" / "clean.jsonl").read_text()
