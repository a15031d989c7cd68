"""FedSA-LoRA: only A crosses the wire; B and the head stay with the client."""

import math

import torch

from fedlora.lora.adapter import LoRAFactors, SharedA
from fedlora.lora.client_state import ClientState
from fedlora.lora.updates import ClientUpdate
from fedlora.rules import ClientSpec, make_rule


def test_a_is_the_weighted_padded_average_and_b_stays_local():
    g = torch.Generator().manual_seed(0)
    rule = make_rule("fedsa")
    top, d_out, d_in = 4, 5, 3
    state = rule.init_state(
        {
            "q": LoRAFactors(
                torch.randn(top, d_in, generator=g, dtype=torch.float64),
                torch.zeros(d_out, top, dtype=torch.float64),
                2.0,
            )
        }
    )
    ranks, counts, alpha = [1, 4, 2], [10, 30, 60], 8.0
    A = [torch.randn(r, d_in, generator=g, dtype=torch.float64) for r in ranks]
    updates = [
        ClientUpdate(str(i), n, {"q": SharedA(A[i], alpha / r)})
        for i, (r, n) in enumerate(zip(ranks, counts))
    ]
    result = rule.aggregate(state, updates)
    assert result.global_update is None and result.relative_deviation() is None

    expected = torch.zeros(top, d_in, dtype=torch.float64)
    for a, r, n in zip(A, ranks, counts):
        expected[:r] += n / 100 * math.sqrt(alpha / r) * a
    own_B = torch.randn(d_out, 2, generator=g, dtype=torch.float64)
    head = {"classifier.weight": torch.randn(3, 5, generator=g, dtype=torch.float64)}
    local = ClientState(adapter={"q": LoRAFactors(A[2], own_B, alpha / 2)}, head=head)
    payload = rule.client_payload(result.state, ClientSpec({"q": 2}, {"q": alpha / 2}, version=1))

    assert (
        set(payload.adapter) == {"q.lora_A.weight"} and not payload.head and not payload.base_change
    )
    loaded = rule.client_step(local, payload)
    torch.testing.assert_close(
        loaded.adapter["q"].A, expected[:2] / math.sqrt(alpha / 2), rtol=0, atol=1e-14
    )
    assert loaded.adapter["q"].B is own_B and loaded.head is head
