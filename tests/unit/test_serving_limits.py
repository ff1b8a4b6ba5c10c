"""Request limits of the served model, checked before any tensor is built: a prompt's tokens, an
image's bytes and pixels (from its header), the answer's length; each refusal names the row, the
limit and the value."""

import base64
import struct
import zlib

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from tests.conftest import build_tiny
from unitoken.registry.serving import Limits, _params, check_prompts, default_limits, parse_rows


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` but carries four rows: what a decompression bomb
    looks like to a server that reads headers (decoding it would allocate width x height x 3)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = zlib.compress(b"\0" * (1 + 3 * width) * 4)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


LIMITS = Limits(max_prompt_tokens=100, max_image_pixels=1000 * 1000, max_image_bytes=2**20, max_new_tokens=64)


def _row(image: bytes) -> pd.DataFrame:
    return pd.DataFrame([{"task": "generate", "prompt": "a red circle", "image": ""},
                         {"task": "understand", "prompt": "what is this?", "image": base64.b64encode(image).decode()}])


@pytest.mark.parametrize("side,message", [(20_000, "more than max_image_pixels=1,000,000 pixels"),
                                          (1_500, "image is 1500 x 1500 = 2,250,000 pixels, more than max_image_pixels")])
def test_an_image_over_the_pixel_limit_is_refused_from_its_header(side, message):
    with pytest.raises(MlflowException, match=message) as err:
        parse_rows(_row(png_header(side, side)), LIMITS)
    assert str(err.value).startswith("row 1: ") and "fix:" in str(err.value)


def test_an_image_over_the_byte_limit_is_refused_before_decoding():
    with pytest.raises(MlflowException, match=r"row 1: image has ~[\d,]+ bytes, more than max_image_bytes=1,048,576"):
        parse_rows(_row(b"\0" * (2**20 + 10)), LIMITS)


def test_prompts_over_the_token_limit_are_refused_naming_the_count():
    _, tok, _ = build_tiny()
    ok = [("generate", "a red circle", None)]
    check_prompts(ok, tok, LIMITS)
    words = " ".join(["red"] * 150)
    with pytest.raises(MlflowException, match=r"row 1: prompt has \d+ tokens, more than max_prompt_tokens=100"):
        check_prompts(ok + [("generate", words, None)], tok, LIMITS)
    with pytest.raises(MlflowException, match="row 0: prompt has 1,048,576 characters, more than max_prompt_tokens=100"):
        check_prompts([("generate", "x" * 2**20, None)], tok, LIMITS)


def test_max_new_tokens_is_capped_and_unknown_params_refused():
    assert _params({"max_new_tokens": 64}, LIMITS)["max_new_tokens"] == 64
    with pytest.raises(MlflowException, match="max_new_tokens=1,000,000 is more than the limit 64"):
        _params({"max_new_tokens": 1_000_000}, LIMITS)
    with pytest.raises(MlflowException, match=r"unknown params \['temprature'\]"):
        _params({"temprature": 0.5}, LIMITS)


def test_defaults_follow_the_model_and_model_config_overrides_them(tmp_path):
    """The prompt limit is what the model's context leaves beside an image and the answer; model
    config (as given to mlflow.pyfunc.load_model) overrides each limit."""
    from unitoken.model.io import save_model

    model, tok, _ = build_tiny()
    save_model(model, tok, tmp_path / "m")
    limits = default_limits(tmp_path / "m")
    context = model.config.llm.max_position_embeddings
    assert 0 < limits.max_prompt_tokens < context and 0 < limits.max_new_tokens < context
    assert limits.max_prompt_tokens + limits.max_new_tokens < context
    custom = Limits.from_config(tmp_path / "m", {"max_prompt_tokens": 7, "passport_sha256": "x"})
    assert custom.max_prompt_tokens == 7 and custom.max_image_pixels == limits.max_image_pixels
