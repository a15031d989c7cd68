"""Fed-SB's initialisation: gradient estimates, sign mode and sketch mode, against brute force."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedlora.errors import ConfigError
from fedlora.lora.fedsb_init import (
    DEFAULT_ETA,
    dense_upload_floats,
    estimate_gradient,
    sign_init,
    sketch_gradients,
    sketch_init,
    sketch_upload_floats,
)
from fedlora.rules.fedsb import FedSB

F64 = torch.float64


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(got - expected) / torch.linalg.matrix_norm(expected))


def brute_force_truncation(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation by a dense SVD; the gap makes it unique."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    if rank < S.shape[0]:
        assert S[rank - 1] - S[rank] > 1e-3 * S[0], "test matrix without a spectral gap"
    return U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]


def brute_force_mean(gradients, counts):
    return sum(n * g for n, g in zip(counts, gradients)) / sum(counts)


def product(init, module: str) -> torch.Tensor:
    fixed = init.fixed[module]
    return fixed.U @ init.cores[module] @ fixed.V


# ---- gradient estimation --------------------------------------------------------------------------


def mse(model, batch):
    x, target = batch
    return ((model(x) - target) ** 2).mean()


def test_gradient_matches_backpropagation_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model[0].weight.requires_grad_(False)  # the estimate must not care, and must restore it
    batches = [(torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64)) for _ in range(3)]
    W1, b1, W2, b2 = (p.detach().clone() for p in model.parameters())

    expected_1, expected_2 = torch.zeros_like(W1), torch.zeros_like(W2)
    for x, target in batches:
        hidden = torch.tanh(x @ W1.T + b1)
        output = hidden @ W2.T + b2
        d_output = 2 * (output - target) / output.numel()
        d_pre = (d_output @ W2) * (1 - hidden**2)
        expected_2 += d_output.T @ hidden / len(batches)
        expected_1 += d_pre.T @ x / len(batches)

    gradients = estimate_gradient(model, mse, batches, ["0", "2"])

    assert set(gradients) == {"0", "2"}
    torch.testing.assert_close(gradients["0"], expected_1, rtol=0, atol=1e-14)
    torch.testing.assert_close(gradients["2"], expected_2, rtol=0, atol=1e-14)
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(model[0].weight, W1, rtol=0, atol=0)


def test_conv1d_gradient_is_in_linear_orientation():
    torch.manual_seed(1)
    conv = nn.Sequential(Conv1D(4, 3)).double()
    linear = nn.Sequential(nn.Linear(3, 4)).double()
    with torch.no_grad():
        linear[0].weight.copy_(conv[0].weight.T)
        linear[0].bias.copy_(torch.randn(4))
        conv[0].bias.copy_(linear[0].bias)
    batches = [(torch.randn(6, 3, dtype=F64), torch.randn(6, 4, dtype=F64)) for _ in range(2)]
    from_conv = estimate_gradient(conv, mse, batches, ["0"])["0"]
    assert from_conv.shape == (4, 3)
    torch.testing.assert_close(from_conv, estimate_gradient(linear, mse, batches, ["0"])["0"])


def test_gradient_needs_batches_and_supported_targets():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    with pytest.raises(ConfigError, match="no batches"):
        estimate_gradient(model, mse, [], ["0"])
    with pytest.raises(ConfigError, match="LayerNorm"):
        estimate_gradient(model, mse, [], ["1"])
    with pytest.raises(ConfigError, match="no module"):
        estimate_gradient(model, mse, [], ["query"])


# ---- sign mode ------------------------------------------------------------------------------------


def test_sign_mode_matches_a_dense_truncated_svd():
    # q = rank + oversample covers min(d_out, d_in) = 5, so svd_lowrank is exact here
    generator = torch.Generator().manual_seed(4)
    counts = [3, 10, 1]
    gradients = [torch.randn(7, 5, generator=generator, dtype=F64) for _ in counts]
    init = sign_init([{"m": g} for g in gradients], counts, rank=2, eta=0.01)
    expected = brute_force_truncation(-0.01 * torch.sign(brute_force_mean(gradients, counts)), 2)
    assert relative_error(product(init, "m"), expected) < 1e-12


def sign_pattern_gradients(generator, counts, pattern, rows, cols):
    """Gradients whose mean has the sign matrix pattern[row group, column group] (rank <= 3)."""
    signs = pattern[rows][:, cols]
    return signs, [
        signs * (0.5 + torch.rand(signs.shape, generator=generator, dtype=F64)) for _ in counts
    ]


def test_sign_mode_is_exact_when_the_sign_matrix_has_low_rank():
    generator = torch.Generator().manual_seed(5)
    pattern = torch.tensor([[1.0, -1, 1, 1], [-1, -1, 1, -1], [1, 1, 1, -1]], dtype=F64)
    rows = torch.randint(0, 3, (60,), generator=generator)
    cols = torch.randint(0, 4, (40,), generator=generator)
    counts = [7, 2]
    signs, gradients = sign_pattern_gradients(generator, counts, pattern, rows, cols)
    estimates = [{"m": g} for g in gradients]

    full = sign_init(estimates, counts, rank=3, oversample=2)  # eta at its default
    assert relative_error(product(full, "m"), -DEFAULT_ETA * signs) < 1e-10

    truncated = sign_init(estimates, counts, rank=2, oversample=2, eta=1.0)
    assert relative_error(product(truncated, "m"), brute_force_truncation(-signs, 2)) < 1e-10


def test_sign_mode_factors_are_orthonormal_seeded_and_leave_the_rng_alone():
    generator = torch.Generator().manual_seed(6)
    estimates = [{"a": torch.randn(30, 20, generator=generator, dtype=F64)}]
    rng_before = torch.get_rng_state()
    init = sign_init(estimates, [4], rank=4, oversample=3, seed=9)
    assert torch.equal(torch.get_rng_state(), rng_before)
    B, A, R = init.fixed["a"].U, init.fixed["a"].V, init.cores["a"]
    torch.testing.assert_close(B.T @ B, torch.eye(4, dtype=F64))
    torch.testing.assert_close(A @ A.T, torch.eye(4, dtype=F64))
    diagonal = torch.diagonal(R)
    assert torch.equal(R, torch.diag(diagonal))
    assert bool((diagonal[:-1] >= diagonal[1:]).all()) and bool((diagonal >= 0).all())
    again = sign_init(estimates, [4], rank=4, oversample=3, seed=9)
    assert torch.equal(again.fixed["a"].U, B) and torch.equal(again.cores["a"], R)


def test_sign_mode_refuses_bad_input():
    g = torch.ones(4, 3)
    with pytest.raises(ConfigError, match="rank 4 outside 1..3"):
        sign_init([{"m": g}], [1], rank=4)
    with pytest.raises(ConfigError, match="shapes"):
        sign_init([{"m": g}, {"m": torch.ones(3, 4)}], [1, 1], rank=1)
    with pytest.raises(ConfigError, match="modules"):
        sign_init([{"m": g}, {"n": g}], [1, 1], rank=1)
    with pytest.raises(ConfigError, match="example counts"):
        sign_init([{"m": g}], [0], rank=1)
    with pytest.raises(ConfigError, match="example counts"):
        sign_init([{"m": g}], [1, 2], rank=1)


# ---- sketch mode ----------------------------------------------------------------------------------


def low_rank_gradients(generator, counts, shape=(30, 20), rank=3):
    """Client gradients U C_i V^T: their mean has rank <= 3, with distinct singular values."""
    U = torch.randn(shape[0], rank, generator=generator, dtype=F64)
    V = torch.randn(shape[1], rank, generator=generator, dtype=F64)
    return [U @ torch.randn(rank, rank, generator=generator, dtype=F64) @ V.T for _ in counts]


def test_sketch_mode_recovers_a_low_rank_mean_gradient():
    generator = torch.Generator().manual_seed(7)
    counts = [5, 1, 12]
    gradients = low_rank_gradients(generator, counts)
    mean = brute_force_mean(gradients, counts)
    for rank in (3, 2):  # the sketch size k = rank + 2 exceeds the mean's rank 3
        sketches = [sketch_gradients({"m": g}, rank, oversample=2, seed=11) for g in gradients]
        init = sketch_init(sketches, counts, rank, eta=0.01, oversample=2, seed=11)
        expected = brute_force_truncation(-0.01 * mean, rank)
        assert relative_error(product(init, "m"), expected) < 1e-10
        top_left = torch.linalg.svd(mean).U[:, :rank]
        B = init.fixed["m"].U
        torch.testing.assert_close(B @ B.T, top_left @ top_left.T, rtol=0, atol=1e-10)


def test_averaged_sketches_are_the_sketch_of_the_mean():
    generator = torch.Generator().manual_seed(8)
    counts = [2, 3]
    gradients = [torch.randn(9, 6, generator=generator, dtype=F64) for _ in counts]
    sketches = [sketch_gradients({"m": g}, 2, oversample=1, seed=3)["m"] for g in gradients]
    of_mean = sketch_gradients({"m": brute_force_mean(gradients, counts)}, 2, 1, seed=3)["m"]
    averaged_Y = brute_force_mean([s.Y for s in sketches], counts)
    averaged_Z = brute_force_mean([s.Z for s in sketches], counts)
    torch.testing.assert_close(averaged_Y, of_mean.Y)
    torch.testing.assert_close(averaged_Z, of_mean.Z)


def test_sketch_mode_refuses_sketches_of_other_sizes():
    g = torch.randn(9, 6, dtype=F64)
    sketches = [sketch_gradients({"m": g}, 2, oversample=1)]
    with pytest.raises(ConfigError, match="sketches of sizes"):
        sketch_init(sketches, [1], rank=2, oversample=2)


def test_upload_counts():
    shapes = {"a": (30, 20), "b": (8, 50)}
    assert dense_upload_floats(shapes) == 30 * 20 + 8 * 50
    # a: k = 3 + 2 = 5, l = 2k + 1 = 11; b: k = 5, l capped at d_out = 8
    expected = (5 * 30 + 11 * 20) + (5 * 8 + 8 * 50)
    assert sketch_upload_floats(shapes, rank=3, oversample=2) == expected
    gradients = {m: torch.randn(*shape, dtype=F64) for m, shape in shapes.items()}
    sketches = sketch_gradients(gradients, rank=3, oversample=2)
    assert sum(s.numel() for s in sketches.values()) == expected


def test_initial_state_runs_the_approximated_step():
    generator = torch.Generator().manual_seed(10)
    counts = [1, 1]
    gradients = low_rank_gradients(generator, counts, shape=(12, 8), rank=2)
    sketches = [sketch_gradients({"m": g}, 2, oversample=2) for g in gradients]
    init = sketch_init(sketches, counts, rank=2, eta=0.5, oversample=2)
    rule = FedSB()
    state = rule.init_state_from_factors(init.fixed, init.cores)
    expected = -0.5 * brute_force_mean(gradients, counts)
    assert relative_error(rule.global_delta(state, "m").dense(), expected) < 1e-10
