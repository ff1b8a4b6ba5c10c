"""A bounded load on a served model (``mlflow models serve`` of the champion, or the KServe
Service): ``clients`` threads send a fixed, seeded mix of understand / generate requests and a
share of malformed ones, each answer recorded with its status and latency. ``bench/serve_load.py``
prints the table; the serving tests assert on the same records.

Standard library only (urllib, threads): it runs wherever the model is served from.
"""

from __future__ import annotations

import json
import random
import statistics
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    kind: str  # "understand" | "generate" | "bad"
    body: dict
    expect: str = ""  # for a bad request: a phrase its 4xx message must hold


@dataclass
class Answer:
    request: Request
    status: int  # HTTP status; 0 when no answer came (refused connection, timeout)
    seconds: float
    body: dict | str


def bad_requests(image_b64: str) -> list[Request]:
    """Malformed requests a client gets wrong, each with what the 400 must say."""
    return [Request("bad", {"dataframe_records": [{"task": "caption", "prompt": "x", "image": ""}]},
                    "unknown task 'caption'"),
            Request("bad", {"dataframe_records": [{"task": "understand", "prompt": "x", "image": "%%%"}]},
                    "image is not valid base64"),
            Request("bad", {"dataframe_records": [{"task": "generate", "prompt": "a red circle", "image": ""}],
                            "params": {"max_new_tokens": 10**9}}, "is more than the limit"),
            Request("bad", {"dataframe_records": [{"task": "understand", "prompt": "x " * 100_000,
                                                   "image": image_b64}]}, "max_prompt_tokens="),
            Request("bad", {"inputs": "not a frame"}, "")]


def good_requests(image_b64: str, max_new_tokens: int = 4, seed: int = 1) -> list[Request]:
    """The well-formed requests the load mixes: questions about an image and prompts to draw."""
    params = {"max_new_tokens": max_new_tokens, "seed": seed}
    asks = ["What is this?", "How many objects are in the image?", "What color is the object in the top left?"]
    draws = ["a red circle", "two blue squares", "a green triangle left of a yellow circle"]
    return ([Request("understand", {"dataframe_records": [{"task": "understand", "prompt": q, "image": image_b64}],
                                    "params": params}) for q in asks]
            + [Request("generate", {"dataframe_records": [{"task": "generate", "prompt": d, "image": ""}],
                                    "params": params}) for d in draws])


def plan(good: list[Request], bad: list[Request], n: int, bad_share: float = 0.05, seed: int = 0) -> list[Request]:
    """``n`` requests in a seeded order: ``round(n * bad_share)`` malformed (at least one when the
    share is above 0), the rest the good ones in turn."""
    rng = random.Random(seed)
    n_bad = max(1 if bad_share > 0 else 0, round(n * bad_share))
    out = [bad[i % len(bad)] for i in range(n_bad)] + [good[i % len(good)] for i in range(n - n_bad)]
    rng.shuffle(out)
    return out


def send(url: str, request: Request, timeout: float = 300.0) -> Answer:
    data = json.dumps(request.body).encode()
    req = urllib.request.Request(f"{url.rstrip('/')}/invocations", data=data,
                                 headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    except OSError as err:  # refused, reset, timed out: no answer
        return Answer(request, 0, time.perf_counter() - t, f"{type(err).__name__}: {err}")
    seconds = time.perf_counter() - t
    try:
        body = json.loads(raw)
    except ValueError:
        body = raw.decode(errors="replace")
    return Answer(request, status, seconds, body)


def hammer(url: str, requests: list[Request], clients: int = 8, timeout: float = 300.0,
           progress=None) -> tuple[list[Answer], float]:
    """Send every request, ``clients`` at a time; (answers in plan order, wall seconds)."""
    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(send, url, r, timeout) for r in requests]
        answers = []
        for f in futures:
            answers.append(f.result())
            if progress:
                progress(len(answers), len(requests))
    return answers, time.perf_counter() - t


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summarize(answers: list[Answer], wall_s: float) -> dict:
    """Per kind and overall: count, 2xx / 4xx / 5xx / no answer, p50 / p95 / p99 latency (s)."""
    rows = {}
    for kind in ("understand", "generate", "bad", "all"):
        picked = [a for a in answers if kind in ("all", a.request.kind)]
        lat = sorted(a.seconds for a in picked)
        rows[kind] = {"n": len(picked), "ok": sum(200 <= a.status < 300 for a in picked),
                      "4xx": sum(400 <= a.status < 500 for a in picked),
                      "5xx": sum(a.status >= 500 for a in picked), "no_answer": sum(a.status == 0 for a in picked),
                      "p50_s": _pct(lat, 50), "p95_s": _pct(lat, 95), "p99_s": _pct(lat, 99)}
    return {"requests": len(answers), "wall_s": wall_s, "requests_per_s": len(answers) / wall_s if wall_s else 0.0,
            "by_kind": rows}
