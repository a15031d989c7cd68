"""Config edges: each refused before anything runs, with one line naming the key, file or
directory (`cli.main.main` prints `ConfigError` as ``fedlora: error: ...``, status 2)."""

from __future__ import annotations

import pytest

from cli import simulate as simulate_command
from cli.main import main
from fedlora.config import RunConfig
from fedlora.data.loading import load_dataset
from fedlora.errors import ConfigError

NOT_UTF8 = b"\xff\xfe\x00"


@pytest.fixture(autouse=True)
def nothing_runs(monkeypatch):
    """A simulation that starts fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the simulation started")

    monkeypatch.setattr(simulate_command, "simulate", refuse)


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedlora: error: "), lines
    return lines[0]


def test_a_recipe_that_is_a_directory(capsys, tmp_path):
    assert "is not a file" in one_line_error(capsys, ["simulate", str(tmp_path)])


def test_a_recipe_that_is_not_utf8(capsys, tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_bytes(b'[run]\nstrategy = "fedavg"\n' + NOT_UTF8)
    assert "bad.toml' is not UTF-8 text" in one_line_error(capsys, ["simulate", str(recipe)])


@pytest.mark.parametrize("text", ["run = 5", "simulation = 'x'"])
def test_a_recipe_table_that_is_not_a_table(capsys, tmp_path, text):
    recipe = tmp_path / "flat.toml"
    recipe.write_text(text + "\n")
    assert "must be a table" in one_line_error(capsys, ["simulate", str(recipe)])


def test_out_under_a_file(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    line = one_line_error(capsys, ["demo", "--out", str(tmp_path / "file" / "run")])
    assert "on its path is a file" in line


def test_out_that_is_a_file(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    assert "is a file" in one_line_error(capsys, ["demo", "--out", str(tmp_path / "file")])


def test_out_that_cannot_be_made(capsys):
    assert "cannot be made" in one_line_error(capsys, ["demo", "--out", "/proc/fedlora-run"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("lora-alpha=" + "9" * 401, "lora-alpha"),
        ("lora-alpha=inf", "lora-alpha"),
        ("learning-rate=inf", "learning-rate"),
        ("weight-decay=inf", "weight-decay"),
        ("dirichlet-alpha=inf", "dirichlet-alpha"),
        ("max-length=100000", "max-length"),
        (f"lora-rank={2**63}", "lora-rank"),
        ("rank-profile=4:0.5,4096:0.5", "rank-profile"),
    ],
)
def test_a_run_key_out_of_range(capsys, override, key):
    line = one_line_error(capsys, ["demo", override])
    assert key in line and len(line) < 300


def test_a_data_file_that_is_not_utf8_is_named(capsys, tmp_path):
    data = tmp_path / "latin1.csv"
    data.write_bytes(b"text,label\ncaf\xe9,1\n")
    line = one_line_error(capsys, ["demo", f"dataset=csv:{data}"])
    assert str(data) in line and "not UTF-8" in line


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("bad.json", b"[1, 2, 3]", "JSON object"),
        ("bad.json", b'{"text": "a", "label"', "cannot be read as json"),
        ("bad.json", NOT_UTF8, "not UTF-8"),
        ("bad.csv", b'text,label\n"a,1\n', "cannot be read as csv"),
        ("bad.parquet", b"not parquet", "cannot be read as parquet"),
    ],
)
def test_an_unreadable_data_file_is_a_config_error_naming_it(tmp_path, name, content, reason):
    data = tmp_path / name
    data.write_bytes(content)
    config = RunConfig(dataset=f"{data.suffix[1:]}:{data}", model="tiny-bert")
    with pytest.raises(ConfigError, match=reason) as error:
        load_dataset(config)
    assert str(data) in str(error.value)


def test_bench_gpus_out_under_a_file(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    line = one_line_error(capsys, ["bench", "gpus", "--out", str(tmp_path / "file" / "runs")])
    assert "on its path is a file" in line
