"""The registered model as an MLflow model: a pyfunc that answers and draws, with a contract.

Registration (``unitoken.registry.register``) packages every version with ``package()``:

    MLmodel                       flavour python_function (models-from-code), signature, params
    serving_entry.py              the code MLflow loads: ``set_model(UniTokenModel())``
    artifacts/handoff/            the stage-3 hand-off (weights, config, tokenizer, handoff.json)
    artifacts/evidence/           passport.json, eval/report.json, eval/items.jsonl, gate/<decision>.json
    input_example.json, serving_input_example.json, requirements.txt

so ``mlflow.pyfunc.load_model("models:/NAME@champion")``, ``mlflow models serve -m ... --env-manager
local`` and KServe's MLflow runtime can use it. No pickle: the model is code plus safetensors.

**Contract.** Input: a DataFrame with ``task`` (``understand`` | ``generate``), ``prompt`` (str),
``image`` (base64 PNG or JPEG; empty for ``generate``). Output: one row per input row with
``text`` (the answer, for ``understand``) and ``image`` (base64 PNG, for ``generate``), the
other column empty. Params (all optional): ``cfg``, ``top_k`` (defaults: the model recipe's,
as for ``unitoken generate``), ``temperature`` (image sampling), ``text_temperature`` (answers;
0 = greedy, the paper's setting), ``seed``, ``max_new_tokens``. Every row is sampled with
``seed``, so a row gets what it gets alone, up to the float rounding of a padded batch
(``studies/small_study/skew_check.py`` measures answers batched vs alone on a trained model).

**Loading refuses a model whose files are not the ones its passport names.** ``load_context``
re-verifies, from the packaged copy: the passport's hash chain, its digest against the one
written into the MLmodel (``model_config.passport_sha256``; a missing one is refused), every
weight file against handoff.json, the hand-off digest against the passport's last stage, and
the evaluation and gate files against their passport entries. The MLmodel travels with the files
it vouches for, so someone who rewrites all of them consistently passes this check; the
registry-side checks (the passport digest on the version tag, the stage runs' recorded
hand-offs) catch that, and ``unitoken lineage`` / every CLI ``models:/`` load run them.

**Bad input** (unknown task, empty prompt, an image that does not decode) raises an
``MlflowException`` naming the row: the scoring server answers that request with HTTP 400 and
goes on serving. **Request limits** (``Limits``: prompt tokens, image pixels and bytes,
``max_new_tokens``) are checked before any tensor is built, from the image's header and the
prompt's length; a request over one is a 400 naming the row, the limit and the value. Their
defaults come from the model's config and the model config of the MLflow model overrides them.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path

TASKS = ("understand", "generate")
PARAMS = {"cfg": 3.0, "top_k": 0, "temperature": 1.0, "text_temperature": 0.0, "seed": 0, "max_new_tokens": 64}
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096  # a 16-megapixel photo; the VQ and SigLIP inputs are far smaller
MAX_NEW_TOKENS = 512
CHARS_PER_TOKEN_BOUND = 16  # a prompt longer than this many characters per allowed token is refused untokenised
BATCH = 16  # rows per forward batch within one request
ENTRY = Path(__file__).with_name("serving_entry.py")


class ModelRefused(RuntimeError):
    """The packaged model failed verification; it is not loaded."""


# --------------------------------------------------------------------------- evidence


def write_evidence(dest: Path, passport: list[dict], eval_dir: Path, gate_file: Path) -> Path:
    """The files the passport's eval and gate entries hash, laid out as the registration run stores them."""
    import shutil

    (dest / "eval").mkdir(parents=True, exist_ok=True)
    (dest / "gate").mkdir(exist_ok=True)
    (dest / "passport.json").write_text(json.dumps(passport, indent=2))
    for f in ("report.json", "items.jsonl"):
        shutil.copyfile(eval_dir / f, dest / "eval" / f)
    shutil.copyfile(gate_file, dest / "gate" / gate_file.name)
    return dest


def verify_packaged(handoff: Path, evidence: Path, passport_sha256: str | None, check_model: bool = True) -> list[str]:
    """Every check ``load_context`` makes; [] when the packaged model is the one the passport describes."""
    from unitoken.registry.passport import canonical_sha, verify_evidence

    passport_file = evidence / "passport.json"
    if not passport_file.is_file():
        return [f"{passport_file} is missing"]
    passport = json.loads(passport_file.read_text())
    problems = []
    if not passport_sha256:
        problems.append("the MLmodel records no passport digest (model_config.passport_sha256)")
    elif canonical_sha({"passport": passport}) != passport_sha256:
        problems.append("passport.json differs from the digest recorded in the MLmodel")
    gates = sorted((evidence / "gate").glob("*.json"))
    if not gates:
        return problems + [f"{evidence / 'gate'} has no gate decision"]
    return problems + verify_evidence(passport, handoff, evidence / "eval", gates[0], check_model)


# --------------------------------------------------------------------------- the signature


def defaults(handoff: Path | None = None) -> dict:
    """The params' defaults: ``PARAMS`` with the model recipe's image sampling (CFG, top-k), as
    ``unitoken generate`` and evaluation use them (``unitoken.recipes.sampling_defaults``)."""
    if handoff is None:
        return dict(PARAMS)
    from unitoken.recipes import sampling_defaults

    sampling, _ = sampling_defaults(handoff)
    return {**PARAMS, "cfg": float(sampling.cfg), "top_k": int(sampling.top_k)}


def signature(handoff: Path | None = None):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    types = {float: "double", int: "long"}
    return ModelSignature(
        inputs=Schema([ColSpec("string", "task"), ColSpec("string", "prompt"),
                       ColSpec("string", "image", required=False)]),
        outputs=Schema([ColSpec("string", "text"), ColSpec("string", "image")]),
        params=ParamSchema([ParamSpec(k, types[type(v)], v) for k, v in defaults(handoff).items()]))


def png_base64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def input_example(image_size: int):
    """Two rows, one per task (the understand row carries a small grey square)."""
    import pandas as pd
    from PIL import Image

    square = Image.new("RGB", (image_size, image_size), (128, 128, 128))
    return pd.DataFrame([{"task": "understand", "prompt": "What shape is in the picture?", "image": png_base64(square)},
                         {"task": "generate", "prompt": "a red circle", "image": ""}])


def requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("unitoken", "mlflow", "torch", "transformers", "safetensors", "tokenizers",
                                           "pillow", "numpy", "pandas")]


def package(dest: Path, handoff: Path, evidence: Path, passport_sha256: str, mlflow_model=None,
            metadata: dict | None = None) -> Path:
    """Write the MLflow model directory ``dest`` for a verified hand-off and its evidence."""
    import mlflow.pyfunc

    from unitoken.model.io import is_handoff_dir

    if not is_handoff_dir(handoff):
        raise ModelRefused(f"{handoff}: not a unitoken hand-off directory")
    size = json.loads((handoff / "config.json").read_text())["model"]["vq"]["resolution"]
    mlflow.pyfunc.save_model(
        path=str(dest), python_model=str(ENTRY), artifacts={"handoff": str(handoff), "evidence": str(evidence)},
        signature=signature(handoff), input_example=(input_example(size), defaults(handoff)),
        pip_requirements=requirements(),
        # the request limits are model config too: visible in the MLmodel, overridable at load
        model_config={"passport_sha256": passport_sha256, **dataclasses.asdict(default_limits(handoff))}, metadata=metadata,
        mlflow_model=mlflow_model)
    return dest


# --------------------------------------------------------------------------- request limits


@dataclass(frozen=True)
class Limits:
    """What one request row may ask for, checked before any tensor is built. Defaults come from
    the model's config (``default_limits``); each can be set as MLflow model config
    (``mlflow.pyfunc.load_model(uri, model_config={"max_prompt_tokens": 512})``)."""

    max_prompt_tokens: int  # the prompt's tokens (the model's context less an image and the answer)
    max_image_pixels: int = MAX_IMAGE_PIXELS  # width x height, read from the header before decoding
    max_image_bytes: int = MAX_IMAGE_BYTES  # the decoded base64 payload
    max_new_tokens: int = MAX_NEW_TOKENS  # the largest ``max_new_tokens`` param accepted

    @classmethod
    def from_config(cls, handoff: Path, overrides: dict | None = None) -> Limits:
        """The model's defaults with the limits named in ``overrides`` (MLflow model config)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return dataclasses.replace(default_limits(handoff),
                                   **{k: int(v) for k, v in (overrides or {}).items() if k in names})


def default_limits(handoff: Path) -> Limits:
    """The limits of the model in ``handoff``: a prompt may take what the context
    (``llm.max_position_embeddings``) leaves beside the largest input image, the longest answer
    allowed and the conversation's markers."""
    from unitoken.config import ModelConfig, from_dict
    from unitoken.model.sequence import CONVERSATION_FRAME, image_block_len, max_input_image_tokens

    cfg = from_dict(ModelConfig, json.loads((handoff / "config.json").read_text())["model"])
    image = max(max_input_image_tokens(cfg), image_block_len(cfg, 0, as_output=True))
    room = cfg.llm.max_position_embeddings - image - CONVERSATION_FRAME
    new_tokens = min(MAX_NEW_TOKENS, room // 2)
    return Limits(max_prompt_tokens=max(1, room - new_tokens), max_new_tokens=max(1, new_tokens))


def check_prompts(rows: list[tuple[str, str, object]], tokenizer, limits: Limits) -> None:
    """Refuse the first prompt over ``limits.max_prompt_tokens``, naming the row, the limit and the
    count; a prompt too long to be within it at any tokenisation is refused without tokenising."""
    for i, (_, prompt, _) in enumerate(rows):
        if len(prompt) > CHARS_PER_TOKEN_BOUND * limits.max_prompt_tokens:
            raise _bad(f"row {i}: prompt has {len(prompt):,} characters, more than max_prompt_tokens="
                       f"{limits.max_prompt_tokens:,} tokens can hold; fix: shorten the prompt")
        n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if n > limits.max_prompt_tokens:
            raise _bad(f"row {i}: prompt has {n:,} tokens, more than max_prompt_tokens={limits.max_prompt_tokens:,}; "
                       "fix: shorten the prompt")


# --------------------------------------------------------------------------- the model


def _bad(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _decode_image(row: int, data, limits: Limits) -> object:
    """A row's base64 image -> PIL RGB; its bytes and its pixel count (from the header) are checked
    against ``limits`` before anything is decoded."""
    from PIL import Image, UnidentifiedImageError

    max_bytes, max_pixels = limits.max_image_bytes, limits.max_image_pixels
    fix = "fix: send a smaller image (the model reads it at a few hundred pixels a side)"
    if not isinstance(data, str) or not data.strip():
        raise _bad(f"row {row}: task 'understand' needs an image (base64 PNG or JPEG in column 'image')")
    if len(data) > max_bytes * 4 // 3 + 4:
        raise _bad(f"row {row}: image has ~{len(data) * 3 // 4:,} bytes, more than max_image_bytes={max_bytes:,}; {fix}")
    try:
        raw = base64.b64decode(data.split(",", 1)[-1] if data.startswith("data:") else data, validate=True)
        with Image.open(io.BytesIO(raw)) as im:  # reads the header only
            if im.format not in ("PNG", "JPEG"):
                raise _bad(f"row {row}: image is {im.format}, expected PNG or JPEG")
            w, h = im.size
            if w * h > max_pixels:
                raise _bad(f"row {row}: image is {w} x {h} = {w * h:,} pixels, more than max_image_pixels="
                           f"{max_pixels:,}; {fix}")
            return im.convert("RGB")
    except (binascii.Error, ValueError) as err:
        raise _bad(f"row {row}: image is not valid base64 ({err})") from None
    except Image.DecompressionBombError as err:  # PIL's own guard, at twice its limit, came first
        raise _bad(f"row {row}: image has more than max_image_pixels={max_pixels:,} pixels ({err}); {fix}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise _bad(f"row {row}: image does not decode as PNG or JPEG ({type(err).__name__}: {err})") from None


def parse_rows(frame, limits: Limits) -> list[tuple[str, str, object]]:
    """Validate a request -> [(task, prompt, PIL image or None)]; the first bad row raises, naming it."""
    missing = [c for c in ("task", "prompt") if c not in frame.columns]
    if missing:
        raise _bad(f"missing column(s) {missing}; expected columns task, prompt, image")
    rows = []
    for i, rec in enumerate(frame.to_dict("records")):
        task, prompt = rec.get("task"), rec.get("prompt")
        if task not in TASKS:
            raise _bad(f"row {i}: unknown task {task!r}; expected one of {list(TASKS)}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise _bad(f"row {i}: empty prompt")
        rows.append((task, prompt, _decode_image(i, rec.get("image"), limits) if task == "understand" else None))
    return rows


def _params(params: dict | None, limits: Limits) -> dict:
    """The request's params over the defaults. Unknown names are refused here; behind ``mlflow
    models serve`` MLflow drops params its signature does not name before the model sees them
    (logging a warning), so a misspelt param there takes its default."""
    p = {**PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
    unknown = sorted(set(p) - set(PARAMS))
    if unknown:
        raise _bad(f"unknown params {unknown}; known: {sorted(PARAMS)}")
    out = {k: type(PARAMS[k])(v) for k, v in p.items()}
    if out["max_new_tokens"] < 1 or out["top_k"] < 0 or out["temperature"] < 0 or out["text_temperature"] < 0:
        raise _bad("params: max_new_tokens must be >= 1, top_k, temperature and text_temperature >= 0")
    if out["max_new_tokens"] > limits.max_new_tokens:
        raise _bad(f"params: max_new_tokens={out['max_new_tokens']:,} is more than the limit {limits.max_new_tokens:,}; "
                   "fix: ask for fewer tokens")
    return out


try:
    import pandas as pd
    from mlflow.pyfunc import PythonModel
except ImportError:  # the [pipeline] extra is not installed: the class is only needed by MLflow
    PythonModel = object


class UniTokenModel(PythonModel):
    """MLflow pyfunc over a verified hand-off (see the module docstring for the contract)."""

    def load_context(self, context) -> None:
        from unitoken.model.devices import pick_device
        from unitoken.model.io import load_model
        from unitoken.model.sequence import SequenceBuilder

        handoff, evidence = Path(context.artifacts["handoff"]), Path(context.artifacts["evidence"])
        problems = verify_packaged(handoff, evidence, (context.model_config or {}).get("passport_sha256"))
        if problems:
            raise ModelRefused(f"refusing to load the model at {handoff.parent.parent}: {problems[0]}"
                               + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
                               + "; it is not the model its passport describes. Re-download it, or register "
                                 "the hand-off again")
        self.limits = Limits.from_config(handoff, context.model_config)
        self.model, tokenizer = load_model(handoff, device=pick_device())
        self.builder = SequenceBuilder(self.model.tokens, tokenizer, self.model.config)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from unitoken.model.generation import (
            decode_images,
            generate_image_codes_batch,
            generate_text_batch,
        )

        p = _params(params, self.limits)
        rows = parse_rows(model_input, self.limits)
        check_prompts(rows, self.builder.tokenizer, self.limits)
        text, image = [""] * len(rows), [""] * len(rows)
        asks = [i for i, r in enumerate(rows) if r[0] == "understand"]
        draws = [i for i, r in enumerate(rows) if r[0] == "generate"]
        for chunk in (asks[k : k + BATCH] for k in range(0, len(asks), BATCH)):
            answers = generate_text_batch(self.model, self.builder, [rows[i][1] for i in chunk],
                                          [[rows[i][2]] for i in chunk], max_new_tokens=p["max_new_tokens"],
                                          temperature=p["text_temperature"], top_k=p["top_k"],
                                          seeds=[p["seed"]] * len(chunk))
            for i, a in zip(chunk, answers):
                text[i] = a
        for chunk in (draws[k : k + BATCH] for k in range(0, len(draws), BATCH)):
            codes = generate_image_codes_batch(self.model, self.builder, [rows[i][1] for i in chunk],
                                               cfg_scale=p["cfg"], temperature=p["temperature"], top_k=p["top_k"],
                                               seeds=[p["seed"]] * len(chunk))
            for i, img in zip(chunk, decode_images(self.model, codes)):
                image[i] = png_base64(img)
        return pd.DataFrame({"text": text, "image": image})
