"""DP-SGD on the GPU steps the model's own weights: a client's cached MiniLM copy, built on CUDA
before Opacus hooks it, has every LoRA B (zero at the start, and the factor whose first gradient
is not zero) changed after the first private step, under bf16 autocast as in real training. The
reverse order (hooking, then moving the model) makes Opacus update stale tensors silently."""

from __future__ import annotations

import pytest
import torch

from clients.worker import Worker
from fedlora.config import RunConfig
from fedlora.models.peft_io import read_adapter
from fedlora.privacy.sample_level import client_plan
from fedlora.training.local import train_private
from tests.support.models import NEEDS_MINILM

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    NEEDS_MINILM,
]


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_every_lora_b_moves_after_the_first_private_step_on_the_gpu(mode):
    config = RunConfig(
        device="cuda",
        max_length=64,
        batch_size=16,
        local_steps=1,
        dp_sample=True,
        dp_grad_sample_mode=mode,
    )
    worker = Worker(config)
    model = worker.lora_model(8).model
    data = worker.data(0, 4)
    before = read_adapter(model)
    assert all(not f.B.any() and f.B.is_cuda for f in before.values())
    plan = client_plan(config, len(data.train))
    _, history = train_private(
        model, data.train, worker.base.tokenizer, config, plan, [], worker.device, seed=0
    )
    after = read_adapter(model)
    assert history == [(plan.noise_multiplier, plan.sample_rate, 1)]
    assert all(after[module].B.abs().min() > 0 for module in before)
    again = worker.lora_model(8).model
    assert again is model and not hasattr(model, "autograd_grad_sample_hooks")
