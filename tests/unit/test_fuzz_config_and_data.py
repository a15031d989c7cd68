"""Property-based fuzzing of the config parser, recipe loading and the data loaders: whatever the
input, the only error that comes out is `ConfigError`."""

from __future__ import annotations

import dataclasses
import itertools
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedlora.config import RunConfig, kebab
from fedlora.data.loading import load_dataset
from fedlora.data.partitioning import clear_caches
from fedlora.errors import ConfigError
from simulations.recipes import check_cluster, load_recipe

KEYS = [kebab(field.name) for field in dataclasses.fields(RunConfig)]
SCALARS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=12),
    st.sampled_from(["fedavg", "flora", "median", "4:0.5,8:0.5", "cpu", "cuda:1", "causal-lm"]),
)
FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RECIPES = settings(max_examples=500, deadline=None)
FILES = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
_names = itertools.count()


@FUZZ
@given(st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), SCALARS))
def test_run_config_refuses_only_with_config_errors(values):
    try:
        config = RunConfig.from_flower(values)
    except ConfigError:
        return
    assert config.lora_rank >= 1 and config.learning_rate > 0


TOML_TEXT = st.one_of(
    st.binary(max_size=80),
    st.lists(
        st.sampled_from(
            [
                b"[run]",
                b"[simulation]",
                b"run = 5",
                b"[other]",
                b"strategy = 'fedavg'",
                b"num-supernodes = -1",
                b"lora-rank = 0",
                b"x = [1, {a = 2}]",
                b"gpus = 1.5",
                b"\xff",
                b"run-dir = 'x'",
                b"[run.nested]",
                b"num-cpus = true",
                b"seed = 3",
                b"ray-address = 'auto'",
                b"ray-address = 'ray://head:10001'",
                b"ray-address = 'head:99999'",
                b"ray-address = 7",
                b"engine = 'in-process'",
                b"base-changes = 'messages'",
            ]
        ),
        max_size=6,
    ).map(b"\n".join),
)


@RECIPES
@given(TOML_TEXT)
def test_recipe_loading_refuses_only_with_config_errors(tmp_path_factory, content):
    path = tmp_path_factory.getbasetemp() / f"recipe-{next(_names)}.toml"
    path.write_bytes(content)
    try:
        recipe = load_recipe(path)
        config = recipe.run_config
        check_cluster(recipe)
    except ConfigError:
        return
    assert config.num_server_rounds >= 1


JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False),
        st.text(max_size=6),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
RECORD = st.fixed_dictionaries(
    {},
    optional={
        "text": JSON_VALUES,
        "label": JSON_VALUES,
        "instruction": JSON_VALUES,
        "response": JSON_VALUES,
    },
)
JSON_FILES = st.one_of(
    st.lists(RECORD, max_size=5).map(lambda rows: json.dumps(rows).encode()),
    st.lists(RECORD, max_size=5).map(lambda rows: "\n".join(map(json.dumps, rows)).encode()),
    JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=40),
)
CSV_FILES = st.one_of(
    st.lists(
        st.lists(st.text(alphabet='ab,"\n\r 01-é', max_size=5), min_size=1, max_size=3),
        max_size=5,
    ).map(lambda rows: "\n".join(",".join(row) for row in [["text", "label"], *rows]).encode()),
    st.text(max_size=40).map(str.encode),
    st.binary(max_size=40),
)


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
@FILES
@given(st.one_of(JSON_FILES.map(lambda b: ("json", b)), CSV_FILES.map(lambda b: ("csv", b))))
@example(("json", b'[{"text": {"\\u0000": null, "": []}}]'))  # Arrow cannot cast it
@example(("json", b'[{"text": {"": null, "\\u0000": null}}]'))  # records with clashing keys
def test_data_files_refuse_only_with_config_errors(task, kind_and_content):
    kind, content = kind_and_content
    model = "tiny-bert" if task == "classification" else "tiny-llama"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data.{kind}"
        path.write_bytes(content)
        clear_caches()
        try:
            load_dataset(RunConfig(dataset=f"{kind}:{path}", task=task, model=model))
        except ConfigError as error:
            assert str(path) in str(error) or f"{kind}:{path}" in str(error)
