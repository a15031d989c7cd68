"""fedlora's model cache: folders written once and atomically; models built from configs saved
by the first process and loaded, bitwise the same, by the next."""

from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from fedlora import cache_folder
from fedlora.errors import ConfigError
from fedlora.models import model_cache
from fedlora.models.base_model import seeded, tiny_llama


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(cache_folder.CACHE_ENV, str(tmp_path))
    assert cache_folder.cache_root() == tmp_path
    monkeypatch.delenv(cache_folder.CACHE_ENV)
    assert cache_folder.cache_root() == Path("~/.cache/fedlora").expanduser()


def test_the_first_writer_wins_and_no_temporary_folder_stays(tmp_path):
    target = tmp_path / "models" / "m"

    def write(text):
        def into(folder):
            (folder / "config.json").write_text(text)

        return into

    model_cache.write_atomically(target, write("first"))
    model_cache.write_atomically(target, write("second"))
    assert (target / "config.json").read_text() == "first"
    assert [path.name for path in target.parent.iterdir()] == ["m"]


def test_a_failed_write_leaves_nothing(tmp_path):
    def fail(folder):
        (folder / "config.json").write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        model_cache.write_atomically(tmp_path / "m", fail)
    assert list(tmp_path.iterdir()) == []


def counted(builds: list[int]):
    def build():
        builds.append(1)
        return tiny_llama()

    return build


def test_a_built_model_is_built_once_and_then_loaded_bitwise_the_same(monkeypatch, tmp_path):
    monkeypatch.setenv(cache_folder.CACHE_ENV, str(tmp_path))
    builds = []
    with seeded(3):
        built = model_cache.built_once("tiny-llama", 3, counted(builds))
    with seeded(4):  # a later process's generator does not matter: nothing is drawn
        loaded = model_cache.built_once("tiny-llama", 3, counted(builds))

    assert len(builds) == 1
    assert model_cache.built_model_folder("tiny-llama", 3).parent == tmp_path / "models"
    assert built.state_dict().keys() == loaded.state_dict().keys()
    for name, weight in built.state_dict().items():
        assert loaded.state_dict()[name].dtype == torch.float32
        assert torch.equal(weight, loaded.state_dict()[name]), name
    with seeded(3):
        model_cache.built_once("tiny-llama", 4, counted(builds))
    assert len(builds) == 2  # another seed, another folder


def test_a_cache_that_cannot_be_written_is_named_and_the_built_model_used(monkeypatch, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv(cache_folder.CACHE_ENV, str(blocked))
    builds = []
    with pytest.warns(UserWarning, match=f"fedlora's cache {blocked}"):
        model = model_cache.built_once("tiny-llama", 0, counted(builds))
    assert len(builds) == 1 and model.config.model_type == "llama"


def test_a_failed_save_is_named_and_the_built_model_used(monkeypatch, tmp_path):
    monkeypatch.setenv(cache_folder.CACHE_ENV, str(tmp_path))

    def full_disk(folder, **options):
        raise SafetensorError("Error while serializing: I/O error: No space left on device")

    def build():
        model = tiny_llama()
        model.save_pretrained = full_disk
        return model

    with pytest.warns(UserWarning, match="No space left on device"):
        model = model_cache.built_once("tiny-llama", 0, build)
    assert model.config.model_type == "llama"
    assert list((tmp_path / "models").iterdir()) == []  # no partial folder left


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_cache_folder_is_named(monkeypatch, tmp_path, damage):
    monkeypatch.setenv(cache_folder.CACHE_ENV, str(tmp_path))
    model_cache.built_once("tiny-llama", 0, tiny_llama)
    weights = model_cache.built_model_folder("tiny-llama", 0) / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        weights.unlink()
    with pytest.raises(ConfigError, match="is damaged .*delete the folder"):
        model_cache.built_once("tiny-llama", 0, tiny_llama)
