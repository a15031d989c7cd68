"""The LoRA-SB layer: its output, what an optimizer may move, HF injection and Opacus."""

import copy
import warnings

import pytest
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model
from transformers.pytorch_utils import Conv1D

from fedlora.errors import ConfigError
from fedlora.lora.adapter import SBCore
from fedlora.lora.client_state import ClientState
from fedlora.lora.lowrank import LowRank
from fedlora.lora.updates import ClientUpdate
from fedlora.models.sb_layer import (
    SBLinear,
    inject_sb_layers,
    load_cores,
    load_fixed_factors,
    read_cores,
    read_fixed_factors,
    sb_layers,
)
from fedlora.rules.base import ClientSpec
from fedlora.rules.fedsb import FedSB

F64 = torch.float64


def padded(block: torch.Tensor, rank: int) -> torch.Tensor:
    out = torch.zeros(rank, rank, dtype=block.dtype)
    out[: block.shape[0], : block.shape[1]] = block
    return out


def random_factors(generator, d_out, d_in, rank, dtype=F64):
    fixed = LowRank(
        torch.randn(d_out, rank, generator=generator, dtype=dtype),
        torch.randn(rank, d_in, generator=generator, dtype=dtype),
    )
    return fixed, torch.randn(rank, rank, generator=generator, dtype=dtype)


def sb_layer(generator, d_out=4, d_in=5, rank=3, capacity=2, base=None):
    base = base or nn.Linear(d_in, d_out).double()
    fixed, core = random_factors(generator, d_out, d_in, rank)
    return SBLinear(base, fixed, core, capacity), fixed, core


@pytest.mark.parametrize("batch_shape", [(7,), (2, 3)])
def test_output_is_base_plus_B_R_plus_padded_delta_A(batch_shape):
    generator = torch.Generator().manual_seed(0)
    layer, fixed, core = sb_layer(generator)
    delta = torch.randn(2, 2, generator=generator, dtype=F64)
    with torch.no_grad():
        layer.sb_delta.weight.copy_(delta)
    x = torch.randn(*batch_shape, 5, generator=generator, dtype=F64)

    W, b = layer.base.weight.detach(), layer.base.bias.detach()
    adapted = W + fixed.U @ (core + padded(delta, 3)) @ fixed.V
    torch.testing.assert_close(layer(x), x @ adapted.T + b, rtol=0, atol=1e-12)
    torch.testing.assert_close(read_cores(nn.Sequential(layer))["0"], core + padded(delta, 3))


def test_conv1d_base_output():
    generator = torch.Generator().manual_seed(1)
    base = Conv1D(4, 5).double()  # weight stored d_in x d_out
    layer, fixed, core = sb_layer(generator, base=base)
    x = torch.randn(6, 5, generator=generator, dtype=F64)
    adapted = base.weight.detach().T + fixed.U @ core @ fixed.V
    torch.testing.assert_close(layer(x), x @ adapted.T + base.bias.detach(), rtol=0, atol=1e-12)


def test_weight_decay_moves_only_the_leading_block():
    generator = torch.Generator().manual_seed(2)
    layer, _, core = sb_layer(generator, rank=4, capacity=2)
    model = nn.Sequential(layer)
    frozen = {
        name: p.detach().clone() for name, p in model.named_parameters() if "delta" not in name
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    x = torch.randn(8, 5, generator=generator, dtype=F64)
    model(x).pow(2).sum().backward()
    optimizer.step()

    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"{name} moved"
    R = read_cores(model)["0"]
    moved = (R - core) != 0
    assert moved[:2, :2].all() and not moved[2:].any() and not moved[:, 2:].any()
    torch.testing.assert_close(R, core + padded(layer.sb_delta.weight.detach(), 4))


def test_load_core_resets_delta_in_place():
    generator = torch.Generator().manual_seed(3)
    layer, _, _ = sb_layer(generator)
    model = nn.Sequential(layer)
    delta_parameter = layer.sb_delta.weight
    with torch.no_grad():
        delta_parameter.fill_(1.0)
    new_core = torch.randn(3, 3, generator=generator, dtype=F64)
    load_cores(model, {"0": new_core})
    assert layer.sb_delta.weight is delta_parameter and not delta_parameter.any()
    torch.testing.assert_close(read_cores(model)["0"], new_core, rtol=0, atol=0)

    replacement, _ = random_factors(generator, 4, 5, 3)
    load_fixed_factors(model, {"0": replacement})
    read = read_fixed_factors(model)["0"]
    assert torch.equal(read.U, replacement.U) and torch.equal(read.V, replacement.V)
    with pytest.raises(ConfigError, match="R must be 3 x 3"):
        load_cores(model, {"0": torch.eye(2, dtype=F64)})
    with pytest.raises(ConfigError, match="modules"):
        load_cores(model, {"other": new_core})


def test_layer_refuses_bad_shapes():
    generator = torch.Generator().manual_seed(4)
    fixed, core = random_factors(generator, 4, 5, 3)
    base = nn.Linear(5, 4).double()
    with pytest.raises(ConfigError, match="capacity 4"):
        SBLinear(base, fixed, core, 4)
    with pytest.raises(ConfigError, match="shape"):
        SBLinear(nn.Linear(4, 4).double(), fixed, core, 1)
    with pytest.raises(ConfigError, match="Embedding"):
        SBLinear(nn.Embedding(4, 5), fixed, core, 1)


# ---- Hugging Face models --------------------------------------------------------------------------


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=20,
        max_position_embeddings=16,
    )
    return BertModel(config).double().eval()


def tiny_gpt2() -> GPT2Model:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    return GPT2Model(config).double().eval()


def factors_for(model, names, rank, generator):
    fixed, cores = {}, {}
    for name in names:
        module = model.get_submodule(name)
        weight = module.weight
        d_out, d_in = weight.shape if isinstance(module, nn.Linear) else weight.shape[::-1]
        fixed[name], cores[name] = random_factors(generator, d_out, d_in, rank)
    return fixed, cores


@pytest.mark.parametrize(
    "build, targets, names",
    [
        (
            tiny_bert,
            ["query", "value"],
            ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"],
        ),
        (tiny_gpt2, ["c_attn"], ["h.0.attn.c_attn"]),
    ],
)
def test_injected_model_equals_the_model_with_merged_weights(build, targets, names):
    generator = torch.Generator().manual_seed(5)
    model = build()
    merged = copy.deepcopy(model)
    fixed, cores = factors_for(model, names, 3, generator)
    assert inject_sb_layers(model, targets, fixed, cores, capacity=2) == names
    with torch.no_grad():
        for name in names:
            module = merged.get_submodule(name)
            delta = fixed[name].U @ cores[name] @ fixed[name].V
            module.weight += delta if isinstance(module, nn.Linear) else delta.T
    ids = torch.randint(0, 50, (2, 7), generator=generator)
    expected = merged(input_ids=ids).last_hidden_state
    torch.testing.assert_close(model(input_ids=ids).last_hidden_state, expected, rtol=0, atol=1e-10)
    assert set(sb_layers(model)) == set(names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n + ".sb_delta.weight" for n in names} | {
        n for n, p in merged.named_parameters() if not any(n.startswith(m) for m in names)
    }


def test_injection_refuses_mismatches():
    generator = torch.Generator().manual_seed(6)
    model = tiny_bert()
    names = ["encoder.layer.0.attention.self.query"]
    fixed, cores = factors_for(model, names, 2, generator)
    with pytest.raises(ConfigError, match="fixed factors"):
        inject_sb_layers(model, ["query", "value"], fixed, cores, capacity=1)
    with pytest.raises(ConfigError, match="Embedding"):
        inject_sb_layers(model, ["word_embeddings"], fixed, cores, capacity=1)
    inject_sb_layers(model, ["query"], fixed, cores, capacity=1)
    with pytest.raises(ConfigError, match="SBLinear"):
        inject_sb_layers(model, ["query"], fixed, cores, capacity=1)


# ---- Opacus ---------------------------------------------------------------------------------------


class TinyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(6, 6)
        self.value = Conv1D(6, 6)
        self.classifier = nn.Linear(6, 2)

    def forward(self, x):
        return self.classifier(torch.relu(self.query(x)) + self.value(x))


def test_one_dp_sgd_step_under_opacus_hooks():
    torch.manual_seed(7)
    model = TinyAttention()
    generator = torch.Generator().manual_seed(7)
    fixed, cores = {}, {}
    for name in ("query", "value"):
        fixed[name], cores[name] = random_factors(generator, 6, 6, 4, dtype=torch.float32)
    inject_sb_layers(model, ["query", "value"], fixed, cores, capacity={"query": 2, "value": 3})
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    data = TensorDataset(torch.randn(16, 6), torch.randint(0, 2, (16,)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, optimizer, loader = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=DataLoader(data, batch_size=8),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
            grad_sample_mode="hooks",
        )
        x, y = next(iter(loader))
        nn.functional.cross_entropy(private(x), y).backward()
        assert private._module.query.sb_delta.weight.grad_sample.shape == (8, 2, 2)
        optimizer.step()

    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"{name} moved"
    R = read_cores(model)
    for name, capacity in (("query", 2), ("value", 3)):
        moved = (R[name] - cores[name]) != 0
        assert moved[:capacity, :capacity].any()
        assert not moved[capacity:].any() and not moved[:, capacity:].any()


# ---- a round through the rule ---------------------------------------------------------------------


def test_trained_layers_aggregate_to_the_ideal_update():
    """Two clients of capacities 1 and 3 train, the server averages R, a loaded layer runs W_t."""
    generator = torch.Generator().manual_seed(8)
    base = nn.Linear(5, 4).double()
    fixed, core = random_factors(generator, 4, 5, 3)
    rule = FedSB()
    state = rule.init_state_from_factors({"0": fixed}, {"0": core})
    W_prev = base.weight.detach() + fixed.U @ core @ fixed.V
    updates, changes, counts = [], [], [3, 5]
    for index, (capacity, count) in enumerate(zip([1, 3], counts)):
        spec = ClientSpec(ranks={"0": capacity}, scales={"0": 1.0}, version=0)
        local = rule.client_step(ClientState(), rule.client_payload(state, spec))
        received = local.adapter["0"]
        model = nn.Sequential(
            SBLinear(
                copy.deepcopy(base),
                LowRank(received.B, received.A),
                local.cores["0"],
                capacity,
            )
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.3, weight_decay=0.1)
        x = torch.randn(10, 5, generator=generator, dtype=F64)
        model(x).sin().sum().backward()
        optimizer.step()
        R = read_cores(model)["0"]
        changes.append(fixed.U @ (R - core) @ fixed.V)
        updates.append(ClientUpdate(str(index), count, {"0": SBCore(R, capacity)}))
    result = rule.aggregate(state, updates)

    ideal = sum(n * c for n, c in zip(counts, changes)) / sum(counts)
    layer = SBLinear(copy.deepcopy(base), fixed, core, 1)
    load_cores(nn.Sequential(layer), {"0": result.state.cores["0"]})
    x = torch.randn(3, 5, generator=generator, dtype=F64)
    expected = x @ (W_prev + ideal).T + base.bias.detach()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
