"""The champion as an MLflow model: after `unitoken pipeline run --local --promote` against a real
MLflow server (artifacts on real S3, SeaweedFS), mlflow.pyfunc loads models:/unitoken@champion with
its signature, `mlflow models serve` answers both tasks over HTTP, bad requests get a 400 naming the
problem; a tampered model is refused at load."""

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import _env, _port, run

pytestmark = pytest.mark.slow
from tests.registry.conftest import NAME


def _register(servers, name: str) -> str:
    out = run(servers, "registry", "register", "--model", "s3/handoff", "--eval", "e", "--gate", "gate.json",
              "--name", name, inprocess=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["version"]


@pytest.fixture
def tracking(local_store, monkeypatch):
    """The environment after `make demo`: MLFLOW_TRACKING_URI on the local store, which holds the
    champion the session's local pipeline run promoted."""
    env = {"MLFLOW_TRACKING_URI": local_store["uri"], "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(local_store["tmp"])
    return {**local_store, "env": {**os.environ, **env}}


@pytest.fixture
def on_servers(servers, monkeypatch):
    """The test servers (artifacts on S3), for the tampering test."""
    for k, v in _env(servers).items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(servers["tmp"])
    return servers


def _image(store) -> Path:
    return store["data"] / "images" / "train" / "s000000.png"


def _b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _rows(store) -> list[dict]:
    image = _image(store)
    return [{"task": "understand", "prompt": "What is this?", "image": _b64(image)},
            {"task": "generate", "prompt": "a red circle", "image": ""}]


def _png(data: str):
    from PIL import Image

    im = Image.open(io.BytesIO(base64.b64decode(data)))
    assert im.format == "PNG"
    return im


def test_pyfunc_loads_the_champion_with_its_signature_and_answers_both_tasks(tracking, champion):
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    sig = model.metadata.signature
    assert sig.inputs.input_names() == ["task", "prompt", "image"]
    assert sig.outputs.input_names() == ["text", "image"]
    assert {"cfg", "top_k", "temperature", "seed", "max_new_tokens"} <= {p.name for p in sig.params.params}
    assert model.metadata.metadata["registered_name"] == NAME
    frame = pd.DataFrame(_rows(tracking))
    out = model.predict(frame, params={"max_new_tokens": 4, "seed": 1})
    assert len(out) == 2 and list(out.columns) == ["text", "image"]
    assert isinstance(out.text[0], str) and out.image[0] == "" and out.text[1] == ""
    from unitoken.recipes import RECIPES

    resolution = RECIPES["tiny"]().model.vq.resolution  # what the local pipeline trains
    assert _png(out.image[1]).size == (resolution, resolution)
    # The answer is the one `unitoken chat` gives for the same image and prompt (greedy both ways).
    chat = subprocess.run([sys.executable, "-m", "unitoken.cli", "chat", "--model", f"models:/{NAME}@champion",
                           "--image", str(_image(tracking)), "--prompt", "What is this?", "--max-new-tokens", "4",
                           "--device", "cpu"], cwd=tracking["tmp"], env=tracking["env"], capture_output=True,
                          text=True, timeout=600)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert chat.stdout.rstrip("\n") == out.text[0]
    # A row's output does not depend on the rest of the request.
    assert model.predict(frame.iloc[[1]], params={"max_new_tokens": 4, "seed": 1}).image[0] == out.image[1]
    for row, message in (({"task": "caption", "prompt": "x", "image": ""}, "row 0: unknown task 'caption'"),
                         ({"task": "generate", "prompt": "  ", "image": ""}, "row 0: empty prompt"),
                         ({"task": "understand", "prompt": "x", "image": base64.b64encode(b"not an image").decode()},
                          "row 0: image does not decode as PNG or JPEG"),
                         ({"task": "understand", "prompt": "x", "image": ""}, "row 0: task 'understand' needs an image")):
        with pytest.raises(MlflowException, match=message):
            model.predict(pd.DataFrame([row]))


def _post(port: int, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@contextlib.contextmanager
def _served(tracking, tmp_path):
    """`mlflow models serve` of the champion on a free port, as the README gives it; (port, process)."""
    port = _port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion",
                             "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port), "-w", "1"],
                            cwd=tracking["tmp"], env={**os.environ, "UNITOKEN_DEVICE": "cpu",
                                                                # the scoring server is the venv's uvicorn
                                                                "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, "mlflow models serve did not answer /ping in 240 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(1)
        yield port, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


def test_mlflow_models_serve_answers_both_tasks_over_http_and_survives_bad_requests(tracking, champion, tmp_path):
    with _served(tracking, tmp_path) as (port, proc):
        good = {"dataframe_records": _rows(tracking), "params": {"max_new_tokens": 4, "seed": 1}}
        status, body = _post(port, good)
        assert status == 200, body
        (understood, drawn) = body["predictions"]
        assert isinstance(understood["text"], str) and understood["image"] == ""
        _png(drawn["image"])
        for bad, message in (([{"task": "caption", "prompt": "x", "image": ""}], "unknown task 'caption'"),
                             ([{"task": "understand", "prompt": "x", "image": "%%%"}], "image is not valid base64")):
            status, body = _post(port, {"dataframe_records": bad})
            assert status == 400 and message in body["message"], body
        # request limits: a 1 MB prompt, a 20k x 20k image (its header; decoding it would take 1.2 GB)
        # and an unbounded answer are refused before any tensor is built, with little memory
        from tests.unit.test_serving_limits import png_header

        huge = base64.b64encode(png_header(20_000, 20_000)).decode()
        for bad, params, message in (
                ([{"task": "generate", "prompt": "a red circle " * 80_000, "image": ""}], {}, "max_prompt_tokens="),
                ([{"task": "understand", "prompt": "x", "image": huge}], {}, "more than max_image_pixels="),
                ([{"task": "generate", "prompt": "x", "image": ""}], {"max_new_tokens": 10**9}, "is more than the limit")):
            status, body = _post(port, {"dataframe_records": bad, "params": params})
            # MLflow prefixes the model's message with "Failed to predict data '<the frame>'... Error: "
            assert status == 400 and message in body["message"], body
            assert ("row 0: " in body["message"] or "params: " in body["message"]) and "fix:" in body["message"]
            assert _tree_rss(proc.pid) < 2 * 2**30
        status, again = _post(port, good)
        assert status == 200 and again["predictions"] == [understood, drawn]  # still serving, same answers


def test_the_served_champion_under_concurrent_load(tracking, champion, tmp_path):
    """Eight clients, 60 requests (understand and generate, 5 % malformed) on one scoring worker:
    every good request answers 200 with what it answers alone, every bad one a 4xx naming the
    problem, and the server's memory levels off (bench/serve_load.py reports the numbers)."""
    import threading

    from unitoken.registry import loadtest

    image = _b64(_image(tracking))
    good, bad = loadtest.good_requests(image), loadtest.bad_requests(image)
    requests = loadtest.plan(good, bad, 60, bad_share=0.05, seed=0)
    with _served(tracking, tmp_path) as (port, proc):
        url = f"http://127.0.0.1:{port}"
        alone = {id(r): loadtest.send(url, r) for r in good}  # one at a time: the reference answers
        assert all(a.status == 200 for a in alone.values()), [a.body for a in alone.values()]
        rss, done = [], threading.Event()

        def sample() -> None:
            while not done.is_set():
                rss.append(_tree_rss(proc.pid))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        answers, wall_s = loadtest.hammer(url, requests, clients=8)
        done.set()
        sampler.join()
        assert proc.poll() is None  # still serving
    summary = loadtest.summarize(answers, wall_s)
    assert summary["by_kind"]["bad"]["n"] == 3 and summary["by_kind"]["all"]["5xx"] == 0, summary
    for a in answers:
        if a.request.kind == "bad":
            assert 400 <= a.status < 500 and a.request.expect in str(a.body), (a.status, a.body)
        else:
            assert a.status == 200, a.body
            assert a.body["predictions"] == alone[id(a.request)].body["predictions"], a.request.body
    quarter = max(1, len(rss) // 4)
    early, late = max(rss[:quarter]), max(rss[-quarter:])
    assert late <= early * 1.25 + 64 * 2**20, [round(x / 2**20) for x in rss]  # MiB: levelled off, not climbing


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and its children (the scoring server's workers)."""
    import psutil

    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def test_a_tampered_model_is_refused_at_load(on_servers, registered):
    tracking = on_servers
    import mlflow.pyfunc

    from unitoken.registry.serving import ModelRefused

    name = "tampered"
    version = _register(tracking, name)
    from mlflow import MlflowClient

    mv = MlflowClient(tracking_uri=tracking["uri"]).get_model_version(name, version)
    model_id = mv.tags["unitoken.logged_model"]
    s3 = tracking["s3"]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow")["Contents"] if model_id in o["Key"]]
    assert any(k.endswith("MLmodel") for k in keys), "the version is not an MLflow model"
    for suffix, change in (("artifacts/handoff/model.safetensors", lambda b: b[:-1] + bytes([b[-1] ^ 1])),
                           ("artifacts/evidence/eval/report.json", lambda b: b.replace(b'"metrics": {', b'"metrics": {"x": 1, '))):
        key = next(k for k in keys if k.endswith(suffix))
        original = s3.get_object(Bucket="mlflow", Key=key)["Body"].read()
        assert change(original) != original
        s3.put_object(Bucket="mlflow", Key=key, Body=change(original))
        try:
            with pytest.raises(ModelRefused, match="refusing to load the model"):
                mlflow.pyfunc.load_model(f"models:/{name}/{version}")
        finally:
            s3.put_object(Bucket="mlflow", Key=key, Body=original)
    assert mlflow.pyfunc.load_model(f"models:/{name}/{version}").metadata.signature is not None


@pytest.mark.skipif(not all(shutil.which(t) for t in ("curl", "jq", "base64", "setsid")),
                    reason="the README's request uses curl, jq and base64 (not installed here)")
def test_the_readmes_use_the_champion_runs_as_written(tracking, champion, tmp_path):
    """README "Use the champion", as written, against the champion in the store `make demo` leaves: the Python
    block, then the local serving lines of the bash block (the server in the background, the curl
    request through jq and base64). The deploy lines after the blank line need a cluster."""
    from tests.integration.test_readme import ROOT, _drop_comment, run_as_written

    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Use the champion\n", 1)[1].split("\n## ", 1)[0]
    python = section.split("```python\n", 1)[1].split("```", 1)[0]
    serving = section.split("```bash\n", 1)[1].split("```", 1)[0].split("\n\n", 1)[0]
    shutil.copyfile(_image(tracking), tmp_path / "question.png")
    (tmp_path / "use.py").write_text(python)
    env = {"MLFLOW_TRACKING_URI": tracking["uri"], "UNITOKEN_DEVICE": "cpu"}
    run_as_written(["python use.py"], tmp_path, env)
    first, request = serving.split("\n", 1)  # the server, then the request (as bash reads it, newlines and all)
    serve = _drop_comment(first).strip()
    assert serve.startswith("mlflow models serve -m models:/unitoken@champion") and "-p 5001" in serve
    assert request.startswith("curl ") and "| jq -r '.predictions[0].image' | base64 -d > red-circle.png" in request
    run_as_written([f"(setsid {serve} > serve.log 2>&1 &) ; for i in $(seq 240); do curl -sf 127.0.0.1:5001/ping "
                    "&& exit 0; sleep 1; done; exit 1", request], tmp_path, env)
    try:
        assert _png(base64.b64encode((tmp_path / "red-circle.png").read_bytes()).decode()).size[0] > 0
    finally:
        subprocess.run(["pkill", "-f", "mlflow models serve -m models:/unitoken@champion --env-manager local -p 5001"])
