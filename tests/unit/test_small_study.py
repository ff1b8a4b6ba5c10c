"""The small study's decisions (studies/small_study/): which VQ-GAN it trains with, its intervals,
its deadlines, and the pipeline steps it runs."""

from pathlib import Path

import pytest

from studies.small_study import report, stats, study


@pytest.mark.parametrize("coarse, fine, want", [
    (0.938, 0.981, "vq"),           # run 4's pair under today's 0.9 minimum: the 8 x 8 grid
    (0.85, 0.981, "vq_fallback"),   # too many objects lost: the finer grid
    (0.85, 0.80, "vq"),             # the fallback is no better: keep the recipe's
    (None, 0.9, "vq_fallback"),     # no scenes to check against counts as 0
])
def test_vq_choice(coarse, fine, want):
    reports = {"vq": {"recognition_rate": coarse}, "vq_fallback": {"recognition_rate": fine}}
    assert study.choose_vq(reports, 0.9) == want


def test_vq_choice_without_a_fallback_keeps_the_recipes():
    assert study.choose_vq({"vq": {"recognition_rate": 0.1}}, 0.9) == "vq"


def test_run_4_would_have_kept_the_fine_grid_at_its_old_minimum():
    reports = {"vq": {"recognition_rate": 0.938}, "vq_fallback": {"recognition_rate": 0.9806}}
    assert study.choose_vq(reports, 0.95) == "vq_fallback"


def test_bootstrap_interval_and_paired_difference():
    lo, hi = stats.bootstrap_ci([1.0] * 30 + [0.0] * 70)
    assert lo < 0.3 < hi and hi - lo < 0.25
    assert stats.bootstrap_ci([]) == [0.0, 0.0]
    d = stats.paired_diff({"a": 0.0, "b": 0.0, "c": 1.0}, {"a": 1.0, "b": 1.0, "c": 1.0, "x": 0.0})
    assert d["n"] == 3 and d["diff"] == pytest.approx(2 / 3, abs=1e-4) and d["ci95"][0] >= 0


@pytest.mark.extended
def test_a_call_deadline_stops_training_with_a_checkpoint_and_the_next_call_resumes(tmp_path, monkeypatch):
    """The study SIGTERMs its training step before a device call's deadline; the run checkpoints at
    its step (exit 143), and the same command in the next call goes on from that step."""
    import json
    import subprocess
    import sys
    import time
    from types import SimpleNamespace

    w = tmp_path / "w"
    (w / "logs").mkdir(parents=True)
    for args in (["data", "synth", "--out", w / "d", "--n", 20],
                 ["model", "init", "--recipe", "tiny", "--out", w / "m"],
                 ["data", "pretokenize", w / "d" / "manifest.jsonl", "--model", w / "m", "--out", w / "p"]):
        subprocess.run([sys.executable, "-m", "unitoken.cli", *map(str, args)], check=True, capture_output=True)
    monkeypatch.setattr(study, "STOP_GRACE_S", 5.0)

    def call(seconds):
        study.T0 = time.time()
        args = SimpleNamespace(out=str(tmp_path / "out"), work=str(w), recipe="tiny", deadline=seconds,
                               save_every=10_000, fast=False, later=0.0)
        (tmp_path / "out").mkdir(exist_ok=True)
        with pytest.raises(study.OutOfTime):
            study.Chain(args, "main").train(1, "s1", w / "m", 100_000, [])
        return [json.loads(x)["step"] for x in (w / "s1" / "metrics.jsonl").read_text().splitlines()]

    first = call(60)
    log = (w / "logs" / "s1.log").read_text()
    assert "stopped by SIGTERM" in log and len(first) > 0
    assert [p.name for p in (w / "s1" / "checkpoints").iterdir()] == [f"step_{first[-1]:06d}"]
    second = call(60)
    assert second[: len(first)] == first and second == list(range(1, len(second) + 1)) and len(second) > len(first)
    doc = json.loads((tmp_path / "out" / "results_main.json").read_text())
    assert doc["partial_seconds"]["s1"] > 60  # both calls' training time, kept across calls
    assert doc["partial_steps"]["s1"] == [second[-1], 100_000]  # how far the cut-off run got



def test_table_5_shows_the_held_out_loss_change_of_joint_training():
    """The report's Table 5: a joint run's held-out loss is set against the single-task run of
    the same encoding (+ = worse when the tasks share training)."""
    def ev(und, gen):
        return {"heldout": {"understanding": {"mean": und, "ci95": [und - 0.1, und + 0.1], "n": 500},
                            "generation": {"mean": gen, "ci95": [gen - 0.1, gen + 0.1], "n": 500}}}

    doc = {"evals": {"abl_disc_und": ev(1.0, 6.0), "abl_disc_gen": ev(6.0, 3.0), "abl_disc_both": ev(1.25, 3.5)},
           "runs": {}, "partial_seconds": {"s2": 1121.7}, "partial_steps": {"s2": [640, 863]}}
    doc["results_main.json"] = {"plan": {"stages": {"s2_steps": 300, "s3_steps": 90, "replanned": {
        "at_step": 200, "step_s": 1.2, "from": {"s2_steps": 863, "s3_steps": 258}}}}}
    text = report.tables(doc)
    assert "shortened from 863 + 258 to 300 + 90 steps when stage 2, at step 200" in text
    doc["results_main.json"]["plan"]["stages"].update(s2_steps=1000, s3_steps=300)
    assert "lengthened from 863 + 258 to 1000 + 300 steps when stage 2, at step 200 (1.2 s/step with the margin), " \
        "had time to spare." in report.tables(doc)
    row = next(line for line in text.splitlines() if line.startswith("| 3 | discrete only | both"))
    assert "1.250 [1.150, 1.350] (+0.250)" in row and "3.500 [3.400, 3.600] (+0.500)" in row
    assert "| s2 (unfinished) | 640 of 863 | 1121.7 |" in text
    # no dual generation-only run (since run 6): row 5 is row 2's run, and the dual joint run's
    # generation change is taken against it
    doc["evals"] |= {"abl_dual_und": ev(0.9, 6.0), "abl_dual_both": ev(0.95, 3.25)}
    doc["results_ablation.json"] = {"unit_steps": 90, "abl_batch": 128}
    text = report.tables(doc)
    assert "Ablation unit u = 90 steps of 128 samples" in text
    row5 = next(line for line in text.splitlines() if line.startswith("| 5 |"))
    assert "row 2's run" in row5 and "3.000 [2.900, 3.100]" in row5
    row6 = next(line for line in text.splitlines() if line.startswith("| 6 |"))
    assert "0.950 [0.850, 1.050] (+0.050)" in row6 and "3.250 [3.150, 3.350] (+0.250)" in row6


def test_an_evaluation_beside_training_hands_its_failure_to_the_chain(tmp_path, monkeypatch):
    """The ablation evaluates a run on a thread while the next one trains; an evaluation that
    runs out of time (or fails) surfaces in the chain's own thread, one evaluation at a time."""
    import threading
    import time
    from types import SimpleNamespace

    (tmp_path / "w").mkdir()
    study.T0 = time.time()
    args = SimpleNamespace(out=str(tmp_path), work=str(tmp_path / "w"), deadline=600)
    chain = study.Chain(args, "ablation")
    running, order = threading.Event(), []

    def fake_eval(name, *rest, **kw):
        assert not running.is_set()  # never two at once
        running.set()
        time.sleep(0.2)
        order.append(name)
        running.clear()
        if name == "late":
            raise study.OutOfTime(f"eval {name}")

    monkeypatch.setattr(chain, "eval", fake_eval)
    chain.eval_beside("a")
    chain.eval_beside("late")  # waits for "a" first
    assert order == ["a"]
    with pytest.raises(study.OutOfTime, match="eval late"):
        chain.wait_evals()
    assert order == ["a", "late"] and chain.pending is None
    chain.wait_evals()  # the failure was handed over once

    # at a call's end the chain waits a bounded time: a slow evaluation is left (a daemon thread,
    # so the process can exit) and the next call redoes it
    def slow_eval(name, *rest, **kw):
        time.sleep(1.0)
        chain.res.set("evals", name, value={})

    monkeypatch.setattr(chain, "eval", slow_eval)
    chain.eval_beside("slow")
    with pytest.raises(study.OutOfTime, match="eval slow .still running"):
        chain.wait_evals(timeout=0.1)
    assert chain.pending.daemon and "slow" not in chain.res.doc["evals"]
    chain.wait_evals()  # it does finish when waited for
    assert "slow" in chain.res.doc["evals"] and chain.pending is None


FAKE_CHAIN = """#!/usr/bin/env bash
# stands in for `python -m studies.small_study.study chain ...`: logs its GPU, role and share, then exits
which=""; share=""
while [ $# -gt 0 ]; do
  case "$1" in --which) which=$2;; --ablation-share) share=$2;; esac; shift
done
echo "start $which gpu=$CUDA_VISIBLE_DEVICES share=$share" >> "$CHAIN_LOG"
sleep 0.5
echo "end $which" >> "$CHAIN_LOG"
[ "$which" = main ] && exit "${MAIN_RC:-0}"
exit 0
"""


@pytest.mark.parametrize("gpus, main_only, main_rc, want", [
    ("0", False, 0, ["start main gpu=0 share=0.5", "end main", "start ablation gpu=0 share=0.5", "end ablation"]),
    ("0", False, 75, ["start main gpu=0 share=0.5", "end main"]),  # main out of time: no ablation this call
    ("0", True, 0, ["start main gpu=0 share=0.0", "end main"]),
    ("0,1", False, 0, None),  # side by side, one GPU each
])
def test_one_gpu_runs_the_ablation_after_the_main_chain(tmp_path, monkeypatch, gpus, main_only, main_rc, want):
    import argparse
    import stat

    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_CHAIN)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(study, "PY", str(fake))
    monkeypatch.setenv("CHAIN_LOG", str(tmp_path / "chains.log"))
    monkeypatch.setenv("MAIN_RC", str(main_rc))
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "setup_done").touch()
    args = argparse.Namespace(out=str(tmp_path / "out"), work=str(tmp_path / "w"), recipe="small", device="cuda",
                              deadline=500.0, later=0.0, gpus=gpus, main_only=main_only, ablation_share=0.5,
                              fast=True, **{k: None for k in ("s1_steps", "s2_steps", "s3_steps", "s3_fraction",
                                                                "limit", "limit_gen", "sweep_limit", "step_factor",
                                                                "reserve", "calib_steps", "abl_unit", "abl_batch", "main_set",
                                                                "save_every", "heldout_limit")})
    study.run(args)
    lines = (tmp_path / "chains.log").read_text().splitlines()
    if want is not None:
        assert lines == want
    else:
        assert sorted(lines[:2]) == ["start ablation gpu=1 share=0.0", "start main gpu=0 share=0.0"]


def test_stages_2_and_3_are_fitted_to_the_time_left_at_stage_2s_measured_speed(tmp_path):
    """Run 5's failure: stage 2 ran at half its planned speed and no stage-2/3 score came out.
    Run 7's waste: stage 2 ran faster than calibrated, and ~190 s of its session went unused.
    Resumed in a later call, the main chain fits stages 2 + 3 and the evaluations into the
    time left at the measured speed: shorter when they do not fit, longer while stage 2 is in
    its first half and the spare time is worth it, as planned otherwise."""
    import json
    import time
    from types import SimpleNamespace

    w = tmp_path / "w"
    (w / "s2" / "checkpoints" / "step_000100").mkdir(parents=True)
    (w / "s2" / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "step_s": 1.0, "loss": 2.0}) + "\n"
                                                    for i in range(1, 98)))
    study.T0 = time.time()

    def chain(deadline):
        args = SimpleNamespace(out=str(tmp_path), work=str(w), deadline=deadline, later=0.0, s2_steps=None,
                               reserve=170.0, step_factor=1.15)
        return study.Chain(args, "main")

    plan = {"s2_steps": 863, "s3_steps": 258}
    # (763 + 258) steps x 1.15 s = 1,174 s, evaluations 230 s: under 5 % to spare keeps the plan
    assert chain(1420).fit_stages(plan) == plan
    longer = chain(2000).fit_stages(plan)  # ~1.5x: both stages by the same factor, into the spare time
    assert longer["s2_steps"] - 100 == pytest.approx(763 * 1770 / 1174.15, abs=3)
    assert longer["s3_steps"] == pytest.approx(258 * 1770 / 1174.15, abs=3)
    assert (longer["s2_steps"] - 100 + longer["s3_steps"]) * 1.15 <= 2000 - 230
    assert longer["replanned"] == {"at_step": 100, "step_s": 1.15, "from": plan}
    (w / "plan_main.json").unlink()
    # past the first half of stage 2 a longer cosine would raise the learning rate: kept ...
    late = {"s2_steps": 190, "s3_steps": 57}
    assert chain(10_000).fit_stages(late) == late
    # ... but shortened there all the same when it does not fit
    shorter = chain(300).fit_stages(late)
    assert shorter["s2_steps"] < 190 and (shorter["s2_steps"] - 100 + shorter["s3_steps"]) * 1.15 <= 70
    (w / "plan_main.json").unlink()
    c = chain(400)
    new = c.fit_stages(plan)
    assert 100 < new["s2_steps"] < 863 and 2 <= new["s3_steps"] < 258
    assert (new["s2_steps"] - 100 + new["s3_steps"]) * 1.15 <= 400 - 170 - 60
    assert new["replanned"] == {"at_step": 100, "step_s": 1.15, "from": plan}
    assert json.loads((w / "plan_main.json").read_text())["stages"] == new  # the next call starts from it
    again = c.fit_stages(new)  # still too slow later on: shortened again, the original plan kept
    assert again["replanned"]["from"] == plan
    # on one GPU the ablation's seconds, fixed with the plan, stay out of the main chain's reach
    shared = chain(600).fit_stages(plan | {"ablation_s": 200.0})
    assert (shared["s2_steps"] - 100 + shared["s3_steps"]) * 1.15 <= 600 - 170 - 60 - 200
    assert shared["ablation_s"] == 200.0


def test_held_out_loss_counts_only_stage_2_sources_and_pairs_the_records(tmp_path):
    """Run 6's understanding loss over all sources was mostly captions and dialogues, which no
    ablation run trains on; the summary keeps stage 2's sources, and the report sets a joint run
    against its single-task run record by record, from the raw archive's per-record files."""
    import io
    import json
    import tarfile

    def records(vqa, caption, t2i):  # one loss per record of each source
        return ([{"id": f"v{i}", "task": "understanding", "category": "synth-vqa", "score": x} for i, x in enumerate(vqa)]
                + [{"id": f"c{i}", "task": "understanding", "category": "synth-caption", "score": x}
                   for i, x in enumerate(caption)]
                + [{"id": f"t{i}", "task": "generation", "category": "synth-t2i", "score": x} for i, x in enumerate(t2i)])

    summary = stats.heldout_summary(records([0.2, 0.4], [9.0], [3.0]))
    assert summary["understanding"]["mean"] == pytest.approx(0.3) and summary["understanding"]["n"] == 2
    assert summary["understanding"]["by_source"] == {"synth-caption": 9.0, "synth-vqa": 0.3}
    assert summary["generation"]["sources"] == ["synth-t2i"]
    pair = {"heldout_records": {"a": records([0.2, 0.4], [9.0], [3.0]), "b": records([0.1, 0.2], [50.0], [3.5])}}
    change = report.paired_change(pair, "b", "a", "understanding")
    assert change["diff"] == pytest.approx(-0.15) and change["n"] == 2  # the caption's rise is not counted
    assert report.paired_change(pair, "b", "missing", "understanding") is None

    runs = {"abl_disc_und": records([0.3, 0.3], [8.0], [15.0]), "abl_disc_gen": records([11.0, 11.0], [14.0], [3.0]),
            "abl_disc_both": records([0.2, 0.2], [9.0], [2.5]), "abl_dual_und": records([0.3, 0.3], [7.0], [14.0]),
            "abl_dual_both": records([0.25, 0.25], [9.0], [2.6])}
    vqa = {"abl_disc_und": [0, 1], "abl_disc_both": [1, 1], "abl_dual_und": [1, 1], "abl_dual_both": [1, 0]}
    with tarfile.open(tmp_path / "raw_ablation.tar.gz", "w:gz") as tar:
        def add(name, rows):
            data = "".join(json.dumps(r) + "\n" for r in rows).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for name, rows in runs.items():
            add(f"evals/{name}/shapes-vqa/heldout.jsonl", rows)
            if name in vqa:
                add(f"evals/{name}/shapes-vqa/items.jsonl", [{"id": f"q{i}", "score": x} for i, x in enumerate(vqa[name])])
    (tmp_path / "results_ablation.json").write_text(json.dumps(
        {"evals": {name: {"heldout": {"understanding": {"mean": 99.0}}} for name in runs}, "unit_steps": 4}))
    doc = report.load(tmp_path)
    assert doc["evals"]["abl_disc_und"]["heldout"]["understanding"]["mean"] == pytest.approx(0.3)  # recomputed
    text = report.tables(doc)
    row3 = next(line for line in text.splitlines() if line.startswith("| 3 |"))
    assert "0.200 [0.200, 0.200] (-0.100 [-0.100, -0.100])" in row3 and "(-0.500 [-0.500, -0.500])" in row3
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| shapes-VQA")
            or line.startswith("| held-out")}
    # VQA: discrete +0.5, dual -0.5 -> dual minus discrete -1.0; und loss: -0.1 vs -0.05 -> +0.05
    assert rows["| shapes-VQA"].startswith("| shapes-VQA | +0.500 [") and "| -1.000 [" in rows["| shapes-VQA"]
    assert "| +0.050 [+0.050, +0.050] | 2 |" in rows["| held-out loss, und"]
    assert "| +0.100 [+0.100, +0.100] | 1 |" in rows["| held-out loss, gen"]  # 2.6 - 2.5 against the shared gen run


def test_a_run_that_finishes_as_the_deadline_comes_counts_as_done(tmp_path, monkeypatch):
    """Run 6's dual_both ended its last step with the SIGTERM in flight (exit 0, hand-off
    written); the study called it cut off and the next call retrained its last 166 steps."""
    import json
    import subprocess
    import time
    from types import SimpleNamespace

    w = tmp_path / "w"
    (w / "logs").mkdir(parents=True)

    def fake_train(rc: int, handoff: bool):
        class Train:  # the train_stage step that gets the SIGTERM: exits rc, with or without a hand-off
            def __init__(self, cmd, **kw):
                self.out, self.done = Path(json.loads(cmd[-1])["work"]), False

            def wait(self, timeout=None):
                if not self.done:
                    raise subprocess.TimeoutExpired("train", timeout)
                return rc

            def terminate(self):
                self.done = True
                if handoff:
                    (self.out / "handoff").mkdir(parents=True)
                    (self.out / "handoff" / "model.safetensors").write_bytes(b"")
                self.out.mkdir(parents=True, exist_ok=True)
                (self.out / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 1.0, "step_s": 0.1}) + "\n")

        return Train

    study.T0 = time.time()
    args = SimpleNamespace(out=str(tmp_path / "out"), work=str(w), recipe="tiny", deadline=26.0, save_every=10,
                           fast=False, later=0.0)
    (tmp_path / "out").mkdir()
    chain = study.Chain(args, "ablation")
    chain.left = lambda: 90.0  # past the start-up check (grace + 30 s)
    monkeypatch.setattr(study, "STOP_GRACE_S", 59.5)  # the fakes time out their first wait anyway
    monkeypatch.setattr(study.subprocess, "Popen", fake_train(0, handoff=True))
    info = chain.train(2, "abl/x", w / "m", 3, [])
    assert info["steps"] == 3 and "abl_x" in chain.res.doc["runs"] and "abl_x" not in chain.res.doc.get(
        "partial_steps", {})
    # checkpointed at the step (143), or exit 0 without a hand-off: cut off, resumed next call
    for n, (rc, handoff) in enumerate([(143, False), (0, False)]):
        monkeypatch.setattr(study.subprocess, "Popen", fake_train(rc, handoff))
        with pytest.raises(study.OutOfTime):
            chain.train(2, f"abl/y{n}", w / "m", 5, [])
        assert chain.res.doc["partial_steps"][f"abl_y{n}"] == [3, 5] and f"abl_y{n}" not in chain.res.doc["runs"]


def test_without_great_expectations_the_synthetic_manifest_is_taken_as_clean(tmp_path, monkeypatch):
    """The GPU machine has no great-expectations: the study then takes the synthetic manifest as
    the clean set, points dataset.json at its images (the steps after read it the same), and
    says validation was skipped."""
    import importlib.util

    from unitoken.data.manifest import data_root
    from unitoken.data.synth import synthesize

    synthesize(tmp_path / "d", 4)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "great_expectations" else real(name))
    summary = study.validated(tmp_path / "d", tmp_path / "v")
    assert "great_expectations not installed" in summary["skipped"]
    assert (tmp_path / "v" / "clean.jsonl").read_bytes() == (tmp_path / "d" / "manifest.jsonl").read_bytes()
    assert data_root(tmp_path / "v" / "clean.jsonl") == (tmp_path / "d").resolve()


def test_a_training_step_stopped_by_sigterm_exits_143(monkeypatch, capsys):
    """The child that runs a step maps the loop's Stopped (SIGTERM, checkpointed at the step) to
    exit 143, which the chain reads as cut off and resumes in the next call."""
    from unitoken.pipeline import steps
    from unitoken.train.train import Stopped

    def stopped(**kwargs):
        raise Stopped(2, 7, Path("ckpt"))

    monkeypatch.setattr(steps, "train_stage", stopped)
    assert study.run_step("train_stage", {"stage": 2}) == 143
    assert "stopped by SIGTERM after step 7" in capsys.readouterr().err
    monkeypatch.setattr(steps, "train_stage", lambda **kwargs: {"steps": kwargs["stage"]})
    assert study.run_step("train_stage", {"stage": 2}) == 0


@pytest.mark.extended
def test_setup_runs_the_pipelines_steps_on_the_cpu(tmp_path):
    """The study's setup on the tiny recipe: synthetic data, validation, both VQ-GANs side by side,
    the two inits and pre-tokenisation, each the pipeline's step, untracked (no MLflow here)."""
    import json
    from types import SimpleNamespace

    w, out = tmp_path / "w", tmp_path / "out"
    (w / "logs").mkdir(parents=True)
    out.mkdir()
    args = SimpleNamespace(recipe="tiny", vq_scenes=16, scenes=16, vq_steps=5, vq_set=[],
                           vq_fallback=["model.vq.channel_multiplier=[1,1,2,2]"], min_recognition=0.9, main_only=False)
    res = study.Results(out)
    study.setup(args, w, out, res)
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["vq_candidates"]) == {"vq", "vq_fallback"} and doc["vq"]["recognition_rate"] is not None
    assert doc["validation"]["d"]["rejected_rows"] == 0
    assert (w / "m" / "model.safetensors").is_file() and (w / "m_disc" / "model.safetensors").is_file()
    assert json.loads((w / "p" / "index.json").read_text())["shards"]
