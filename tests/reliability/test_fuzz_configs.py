"""Fuzzing (hypothesis) of what users type: gate policies, cluster configs, `--set` overrides.

Property: any input either loads, or is refused with the project's own error type whose message
names the offending field; never a TypeError/AttributeError/KeyError from deep inside.
`python bench/fuzz_configs.py --examples 10000` runs the same properties at bench scale."""

from __future__ import annotations

import os

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unitoken.config import ConfigError

EXAMPLES = int(os.environ.get("UNITOKEN_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)


def _mapping(keys: list[str]):
    return st.dictionaries(st.one_of(st.sampled_from(keys), st.text(max_size=8)), values, max_size=5)


@FUZZ
@given(doc=st.one_of(values, _mapping(["floors", "margins", "primary", "min_improvement", "bootstrap"])))
def test_gate_policy_files(tmp_path_factory, doc):
    from unitoken.eval.gate import GatePolicy

    path = tmp_path_factory.mktemp("policy") / "policy.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        GatePolicy.from_yaml(path)
    except ValueError as err:
        assert str(path) in str(err)


CLUSTER_KEYS = ["image", "namespace", "checkpoint_pvc", "env", "secrets", "queue", "cpu", "gpu", "steps", "launcher", "node_pools",
                "image_pull_secrets", "checkpoint_mount", "trainer_runtime"]
RESOURCE = _mapping(["cpu", "memory", "gpus", "node_selector", "tolerations", "workload_priority_class", "num_nodes",
                     "timeout_s", "retries"])


@FUZZ
@given(doc=_mapping(CLUSTER_KEYS), gpu=st.one_of(st.none(), RESOURCE),
       steps=st.dictionaries(st.sampled_from(["train-stage2", "evaluate", "open-run", "bogus"]), RESOURCE, max_size=2))
def test_cluster_configs(doc, gpu, steps):
    from unitoken.pipeline.cluster import cluster_from_dict

    if gpu is not None:
        doc["gpu"] = gpu
    if steps:
        doc["steps"] = steps
    try:
        cluster_from_dict(doc)
    except ConfigError as err:
        assert "cluster" in str(err)


@FUZZ
@given(key=st.one_of(st.sampled_from(["train.seed", "train.stage2.batch_size", "model.llm.hidden_size",
                                      "train.stage1.optim.lr", "model.vision.anyres", "train.precision",
                                      "model.encoder_mode", "train.stage3.sources", "nope.x", "train"]),
                     st.text(max_size=15)),
       value=st.one_of(st.text(max_size=15), st.integers(-10, 10**9).map(str), st.just("[1, 2]"),
                       st.just("{a: 1}"), st.just("null"), st.just("nan")),
       sep=st.sampled_from(["=", "", "=="]))
def test_set_overrides(key, value, sep):
    from unitoken.recipes import get_recipe

    try:
        get_recipe("tiny", [f"{key}{sep}{value}"])
    except ConfigError as err:
        assert str(err)
