"""``cpu-autocast``: on the CPU the forward passes of training (alone and in a group) and of
evaluation run under bf16 autocast where the run asks for it, in float32 otherwise; the weights,
the LoRA factors and the optimizer stay float32; ``auto`` follows whether the CPU multiplies
bfloat16 natively, outside DP-SGD, which refuses bfloat16."""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from fedlora.config import RunConfig
from fedlora.data import partitioning
from fedlora.errors import ConfigError
from fedlora.models.base_model import BaseModel, load_base_model, with_lora
from fedlora.models.grouped_lora import group_of_peft_models
from fedlora.training import local
from fedlora.training.grouped import train_group
from fedlora.training.local import (
    cpu_autocast,
    evaluate,
    native_cpu_bf16,
    train_local,
    train_round,
)
from tests.support.models import VOCAB, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

PRECISIONS = [("off", torch.float32), ("bfloat16", torch.bfloat16)]


@contextmanager
def linear_output_dtypes(model: nn.Module):
    """The dtypes of every ``nn.Linear`` output while the block runs."""
    seen: set[torch.dtype] = set()
    handles = [
        module.register_forward_hook(lambda _m, _i, output: seen.add(output.dtype))
        for module in model.modules()
        if isinstance(module, nn.Linear)
    ]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize(
    ("mode", "native", "expected"),
    [("off", True, False), ("bfloat16", False, True), ("auto", True, True), ("auto", False, False)],
)
def test_the_mode_and_the_cpu_decide(monkeypatch, mode, native, expected):
    monkeypatch.setattr(local, "native_cpu_bf16", lambda: native)
    assert cpu_autocast(RunConfig(cpu_autocast=mode)) is expected


def test_native_bf16_is_amx_or_avx512_bf16(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert native_cpu_bf16()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert not native_cpu_bf16()
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert not native_cpu_bf16()  # a torch without the probes: float32


def test_dp_sgd_refuses_bfloat16_and_keeps_float32_under_auto(monkeypatch):
    with pytest.raises(
        ConfigError, match="cpu-autocast = 'bfloat16' is not supported with dp-sample"
    ):
        RunConfig.from_flower({"cpu-autocast": "bfloat16", "dp-sample": True})
    monkeypatch.setattr(local, "native_cpu_bf16", lambda: True)
    assert not cpu_autocast(RunConfig(cpu_autocast="auto", dp_sample=True))


def test_an_unknown_mode_is_refused():
    with pytest.raises(ConfigError, match="cpu-autocast = 'float16': choose one of"):
        RunConfig.from_flower({"cpu-autocast": "float16"})


@pytest.mark.parametrize(("mode", "dtype"), PRECISIONS)
def test_a_round_and_an_evaluation_run_in_the_asked_precision(mode, dtype, words_spec):
    config = RunConfig(
        model="tiny-bert", dataset=words_spec, cpu_autocast=mode, local_steps=2, batch_size=8
    )
    base = load_base_model(config)
    model = with_lora(base, 4, 8.0, False, config.target_module_names, config.head_module_names)
    data = partitioning.client_data(config, 0, 1)
    with linear_output_dtypes(model) as trained_in:
        report = train_round(model, data.train, base.tokenizer, config, "cpu", seed=0)
    with linear_output_dtypes(model) as evaluated_in:
        evaluation = evaluate(model, data.test, base.tokenizer, config, "cpu")
    assert trained_in == evaluated_in == {dtype}
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}
    assert math.isfinite(report.loss) and math.isfinite(evaluation.loss)


def causal_batches(seed: int, steps: int = 2) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = [torch.randint(3, VOCAB, (2, 8), generator=generator) for _ in range(steps)]
    return [{"input_ids": ids, "labels": ids.clone()} for ids in input_ids]


@pytest.mark.parametrize(("mode", "dtype"), PRECISIONS)
def test_a_group_trains_in_the_asked_precision_as_its_clients_alone(mode, dtype):
    base = BaseModel(model=tiny_llama().float(), tokenizer=None, num_labels=0)
    clients = [
        with_lora(base, rank, 2.0 * rank, False, ("q_proj", "v_proj"), (), seed=seed)
        for rank, seed in ((2, 1), (4, 2))
    ]
    twins = [copy.deepcopy(model) for model in clients]
    data = [causal_batches(seed) for seed in (1, 2)]
    group = group_of_peft_models(copy.deepcopy(base.model), clients)
    cpu_bf16 = mode == "bfloat16"
    with linear_output_dtypes(group) as grouped_in:
        reports = train_group(group, data, 2, 0.05, 0.0, "cpu", seed=0, cpu_bf16=cpu_bf16)
    assert grouped_in == {dtype}
    assert {parameter.dtype for parameter in group.trainable_parameters()} == {torch.float32}
    for twin, batches, report in zip(twins, data, reports, strict=True):
        alone = train_local(twin, batches, 2, 0.05, 0.0, "cpu", seed=0, cpu_bf16=cpu_bf16)
        assert report.loss == pytest.approx(alone.loss, rel=1e-2)
