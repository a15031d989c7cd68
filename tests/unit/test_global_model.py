"""The server's view of the global model: what a client of each rank runs, in a plain model."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedlora.lora.global_model import plain_model_with, rank_class_deltas
from fedlora.models.peft_io import pretrained_weights
from fedlora.rules import make_rule
from tests.support.models import tiny_bert, tiny_gpt2, token_batch
from tests.support.rounds import Federation, effective


@pytest.mark.parametrize("name", ["fedavg", "fedex", "flora", "lorafair", "flexlora", "hetlora"])
def test_rank_classes_run_what_their_clients_run(name):
    ranks = [2, 4, 8, 4]
    federation = Federation(make_rule(name), {"q": (9, 6), "v": (6, 9)}, ranks, [5, 9, 4, 7])
    for _ in range(2):
        federation.round([0, 1, 2, 3])
    for i, rank in enumerate(ranks):
        deltas = rank_class_deltas(
            federation.rule, federation.state, rank, federation.alpha, False, torch.float64
        )
        for module in federation.shapes:
            expected = effective(federation.locals[i], module)
            torch.testing.assert_close(deltas[module], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", [tiny_bert, tiny_gpt2])
def test_plain_model_runs_the_weights_of_a_peft_model(family):
    """W_0 + delta written into a plain copy equals the peft model's merged weights (Conv1D too)."""
    base = family()
    targets = ["query", "value"] if family is tiny_bert else ["c_attn"]
    peft_model = get_peft_model(
        family(),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=targets,
            init_lora_weights=False,
            fan_in_fan_out=family is tiny_gpt2,
        ),
    )
    pretrained_weights(peft_model)
    deltas = {
        name: layer.get_delta_weight("default").T
        if family is tiny_gpt2
        else layer.get_delta_weight("default")
        for name, layer in peft_model.named_modules()
        if hasattr(layer, "get_delta_weight") and hasattr(layer, "lora_A")
    }
    plain = plain_model_with(base, deltas, {})
    batch = token_batch()
    with torch.no_grad():
        expected = peft_model(**batch).logits
        got = plain(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
