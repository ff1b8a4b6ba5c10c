"""`unitoken plan` for unitoken-7b on examples/cluster.yaml: per-stage samples, tokens, GPU-hours and
wall-clock, checked against a hand computation from a small pre-tokenised fixture (7B shapes: the
encoder at 512 px, the real tokenizer, the parameters of the model built on the meta device)."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch

from unitoken.data.pretokenize import pretokenize
from unitoken.data.synth import synthesize
from unitoken.model.sequence import IGNORE
from unitoken.model.vq import VQTokenizer
from unitoken.recipes import get_recipe

ROOT = Path(__file__).resolve().parents[2]
MFU = 0.43


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    recipe = get_recipe("unitoken-7b")
    synthesize(d / "d", 3, size=64, seed=4)
    # pretokenize needs the VQ-GAN and the configs of the model, not its 7 B parameters
    model = types.SimpleNamespace(vq=VQTokenizer(recipe.model.vq), config=recipe.model)
    pretokenize(d / "d" / "manifest.jsonl", model, d / "p", device="cpu")
    return d / "p"


def _by_hand(recipe, data: Path) -> dict[int, dict]:
    """FLOPs per sample from first principles: 6 x body parameters per token, 6 x head per supervised
    token, 6 x layers x hidden x n^2 of attention, 6 x (tower + adapter) per patch of each tile."""
    from unitoken.data.dataset import ShardDataset
    from unitoken.model.sequence import SequenceBuilder
    from unitoken.model.tokens import SpecialTokens, build_tokenizer
    from unitoken.model.unitoken import UniToken

    cfg = recipe.model
    tok = build_tokenizer(cfg.llm.vocab_size, cfg.vq.num_codes, cfg.max_grid_tokens)
    with torch.device("meta"):
        model = UniToken(cfg, tok.get_vocab())
    body = sum(p.numel() for n, p in model.llm.named_parameters() if not n.startswith("embed_tokens"))
    head = model.lm_head.weight.numel()
    vision = sum(p.numel() for p in model.vision.parameters()) + sum(p.numel() for p in model.adapter.parameters())
    builder = SequenceBuilder(SpecialTokens.from_vocab(tok.get_vocab(), cfg.max_grid_tokens), tok, cfg)
    cluster_gpus = {1: 8, 2: 32, 3: 8}  # examples/cluster.yaml: train-stage2 is 4 nodes x 8
    out = {}
    for n in (1, 2, 3):
        stage = recipe.train.stage(n)
        ratios = {"understanding": stage.understanding_ratio, "generation": stage.generation_ratio}
        ds = ShardDataset(data, builder, sources=list(stage.sources) or None, splits=["train"])
        tokens = flops = 0.0
        for task, w in ratios.items():
            if w <= 0:
                continue
            samples = [ds[i] for i, t in enumerate(ds.tasks()) if t == task]
            share = w / sum(v for v in ratios.values() if v > 0)
            per = []
            for s in samples:
                t = len(s.encoded.input_ids)
                sup = sum(1 for x in s.encoded.labels[1:] if x != IGNORE)
                tiles = 0 if s.images is None else s.images.pixel_values.shape[0]
                per.append(6 * body * t + 6 * head * sup + 6 * cfg.llm.num_layers * cfg.llm.hidden_size * t * t
                           + 6 * vision * tiles * cfg.vision.patches_per_side ** 2)
            tokens += share * sum(len(s.encoded.input_ids) for s in samples) / len(samples)
            flops += share * sum(per) / len(per)
        n_samples = stage.batch_size * stage.max_steps
        gpu_hours = n_samples * flops / (MFU * 989e12) / 3600
        out[n] = {"samples": n_samples, "tokens": n_samples * tokens, "gpu_hours": gpu_hours,
                  "wall_hours": gpu_hours / cluster_gpus[n]}
    return out


def test_the_plan_of_the_7b_recipe_matches_a_hand_computation(data, capsys):
    from unitoken.cli import main

    recipe = get_recipe("unitoken-7b")
    expected = _by_hand(recipe, data)
    args = ["plan", "--recipe", "unitoken-7b", "--data", str(data), "--cluster", str(ROOT / "examples" / "cluster.yaml"),
            "--mfu", str(MFU), "--price-per-gpu-hour", "2.0"]
    assert main([*args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    for st in doc["stages"]:
        want = expected[st["stage"]]
        assert st["samples"] == want["samples"]
        assert st["tokens"] == pytest.approx(want["tokens"], rel=1e-6, abs=1)
        assert st["gpu_hours"] == pytest.approx(want["gpu_hours"], rel=1e-3, abs=0.01)
        assert st["wall_hours"] == pytest.approx(want["wall_hours"], rel=1e-3, abs=0.01)
        assert all(note.startswith("ok") for note in st["fits"]), st["fits"]
    assert doc["cost"] == pytest.approx(2.0 * doc["gpu_hours"], rel=1e-6)
    assert main(args) == 0  # the table people read
    text = capsys.readouterr().out
    assert "GPU-hours" in text and "wall-clock" in text and "Kueue quota 32 GPUs" in text



def test_a_stage_beyond_its_pool_and_the_quota_fails_the_plan(data, tmp_path, capsys):
    import yaml

    from unitoken.cli import main

    doc = yaml.safe_load((ROOT / "examples" / "cluster.yaml").read_text())
    doc["cluster"]["steps"]["train-stage2"]["num_nodes"] = 5  # 40 GPUs: 4 nodes in the pool, 32 in the quota
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump(doc))
    assert main(["plan", "--recipe", "unitoken-7b", "--data", str(data), "--cluster", str(cluster), "--mfu", "0.4"]) == 1
    text = capsys.readouterr().out
    assert "stage 2: NO: node pool h200 (4 nodes x 8 GPUs) cannot hold 5 x 8" in text
    assert "stage 2: NO: Kueue quota 32 GPUs, the step asks 40" in text


def test_submit_prints_the_plan_and_wants_yes_above_the_configured_gpu_hours(data, capsys):
    """`pipeline submit` with --plan-data prints the plan; above the cluster config's
    confirm_gpu_hours it refuses without --yes, and without --plan-data it says how to see the plan."""
    import yaml

    from unitoken.cli.common import UsageError
    from unitoken.cli.pipeline import _confirm_plan
    from unitoken.pipeline.cluster import cluster_from_dict

    doc = yaml.safe_load((ROOT / "examples" / "cluster.yaml").read_text())["cluster"]
    params = {"recipe": "unitoken-7b", "data_uri": "s3://b/d"}
    strict = cluster_from_dict({**doc, "confirm_gpu_hours": 0.0})
    with pytest.raises(UsageError, match="above the cluster config's confirm_gpu_hours 0: submit again with --yes"):
        _confirm_plan(types.SimpleNamespace(plan_data=data, yes=False), params, strict, (1, 2, 3))
    assert "GPU-hours on 32 GPUs" in capsys.readouterr().out  # stage 2's line of the plan
    _confirm_plan(types.SimpleNamespace(plan_data=data, yes=True), params, strict, (1, 2, 3))
    with pytest.raises(UsageError, match="pass --plan-data"):
        _confirm_plan(types.SimpleNamespace(plan_data=None, yes=False), params, strict, (1, 2, 3))
    _confirm_plan(types.SimpleNamespace(plan_data=None, yes=False), params, cluster_from_dict(doc), (1, 2, 3))
