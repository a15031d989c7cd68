"""LoRA-FAIR: FedAvg's factors with B corrected towards the ideal direction, checked densely."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora.errors import ConfigError, InvalidUpdateError
from fedlora.lora.adapter import LoRAFactors
from fedlora.lora.client_state import ClientState
from fedlora.lora.updates import ClientUpdate, ClientUpdates, example_weights
from fedlora.rules import ClientSpec, lorafair, make_rule

DTYPE = torch.float64


def random_factors(generator, d_out, d_in, rank, scale):
    return LoRAFactors(
        A=torch.randn(rank, d_in, generator=generator, dtype=DTYPE),
        B=torch.randn(d_out, rank, generator=generator, dtype=DTYPE),
        scale=scale,
    )


def product(factors: LoRAFactors) -> torch.Tensor:
    return factors.scale * factors.B @ factors.A


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x * y).sum() / (torch.linalg.matrix_norm(x) * torch.linalg.matrix_norm(y)))


def dense_target(initial, updates, module):
    """W_{t-1} + sum_i p_i (s_i B_i A_i - start_i), each client starting from its leading slice."""
    start = initial[module]
    target = product(start)
    total = sum(u.num_examples for u in updates)
    for update in updates:
        factors, r0 = update.modules[module], update.modules[module].rank
        start_i = start.scale * start.B[:, :r0] @ start.A[:r0]
        target = target + update.num_examples / total * (product(factors) - start_i)
    return target


def federation(seed, shapes, top, ranks, counts, alpha=8.0):
    generator = torch.Generator().manual_seed(seed)
    initial = {
        m: random_factors(generator, d_out, d_in, top, alpha / top)
        for m, (d_out, d_in) in shapes.items()
    }
    updates = [
        ClientUpdate(
            str(i),
            n,
            {
                m: random_factors(generator, d_out, d_in, r, alpha / r)
                for m, (d_out, d_in) in shapes.items()
            },
        )
        for i, (r, n) in enumerate(zip(ranks, counts))
    ]
    return initial, updates


def aggregate(name, initial, updates, **options):
    rule = make_rule(name, **options)
    return rule.aggregate(rule.init_state(initial), updates)


def global_product(result, module):
    return result.state.factors[module].dense()


cases = st.integers(1, 6).flatmap(
    lambda k: st.fixed_dictionaries(
        {
            "d_out": st.integers(1, 7),
            "d_in": st.integers(1, 7),
            "ranks": st.lists(st.integers(1, 8), min_size=k, max_size=k),
            "counts": st.lists(st.integers(1, 50), min_size=k, max_size=k),
            "seed": st.integers(0, 2**16),
        }
    )
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases)
def test_cosine_to_the_target_is_never_worse_than_fedavg(case):
    shapes = {"q": (case["d_out"], case["d_in"])}
    initial, updates = federation(
        case["seed"], shapes, max(case["ranks"]), case["ranks"], case["counts"]
    )
    target = dense_target(initial, updates, "q")
    fedavg = cosine(global_product(aggregate("fedavg", initial, updates), "q"), target)
    fair = cosine(global_product(aggregate("lorafair", initial, updates, steps=60), "q"), target)
    assert fair >= fedavg - 1e-12


def constructed_case():
    """Two rank-1 clients, scale 1, equal weights, from a zero global product.

    T = (e1 e1^T + e2 (e1 + e2)^T) / 2; FedAvg gives U = (e1 + e2) / 2, V = (2 e1 + e2)^T / 2, and
    T V^T points along (2, 3), not along U: FedAvg's B is off the best direction for its A.
    """
    e = torch.eye(3, dtype=DTYPE)
    zero = LoRAFactors(
        A=torch.zeros(1, 3, dtype=DTYPE), B=torch.zeros(3, 1, dtype=DTYPE), scale=1.0
    )
    one = ClientUpdate("a", 5, {"q": LoRAFactors(A=e[:1], B=e[:, :1], scale=1.0)})
    two = ClientUpdate("b", 5, {"q": LoRAFactors(A=e[:1] + e[1:2], B=e[:, 1:2], scale=1.0)})
    return {"q": zero}, [one, two]


def test_strictly_better_than_fedavg_where_fedavg_deviates():
    initial, updates = constructed_case()
    target = 0.5 * (torch.outer(torch.tensor([1.0, 0, 0]), torch.tensor([1.0, 0, 0])))
    target = target + 0.5 * torch.outer(torch.tensor([0, 1.0, 0]), torch.tensor([1.0, 1, 0]))
    assert torch.allclose(dense_target(initial, updates, "q"), target.to(DTYPE))
    fedavg = global_product(aggregate("fedavg", initial, updates), "q")
    assert torch.allclose(
        fedavg, 0.25 * torch.outer(torch.tensor([1.0, 1, 0]), torch.tensor([2.0, 1, 0])).to(DTYPE)
    )
    fair = cosine(global_product(aggregate("lorafair", initial, updates), "q"), target.to(DTYPE))
    assert fair > cosine(fedavg, target.to(DTYPE)) + 0.01
    best = math.sqrt(0.8125 / 0.9375)  # ||T v|| / (||v|| ||T||) with v = (1, 0.5, 0)
    assert best - 1e-3 < fair <= best + 1e-12


def test_without_penalty_reaches_the_best_cosine_for_fedavgs_A():
    """With V fixed, max cos(X V, T) = ||T Pi_V|| / ||T|| (Pi_V: projector on V's row space)."""
    initial, updates = federation(3, {"q": (9, 7)}, 4, [2, 4, 3], [10, 20, 30])
    target = dense_target(initial, updates, "q")
    V = aggregate("fedavg", initial, updates).state.factors["q"].V
    projector = V.T @ torch.linalg.pinv(V @ V.T) @ V
    best = float(torch.linalg.matrix_norm(target @ projector) / torch.linalg.matrix_norm(target))
    result = aggregate("lorafair", initial, updates, steps=1500, lam=0.0, lr=0.01)
    assert torch.equal(result.state.factors["q"].V, V)
    reached = cosine(global_product(result, "q"), target)
    assert best - 1e-3 < reached <= best + 1e-12


def test_objective_and_gradient_from_factors_match_the_dense_ones():
    generator = torch.Generator().manual_seed(7)
    U, V = (
        torch.randn(6, 3, generator=generator, dtype=DTYPE),
        torch.randn(3, 5, generator=generator, dtype=DTYPE),
    )
    P, Q = (
        torch.randn(6, 4, generator=generator, dtype=DTYPE),
        torch.randn(4, 5, generator=generator, dtype=DTYPE),
    )
    Z = torch.randn(6, 3, generator=generator, dtype=DTYPE)
    scale, lam, T = 0.7, 0.3, P @ Q
    value, gradient = lorafair.objective_and_gradient(
        U[None],
        torch.tensor(scale, dtype=DTYPE).reshape(1, 1, 1),
        Z[None],
        (P @ (Q @ V.T))[None],
        (V @ V.T)[None],
        torch.linalg.matrix_norm(T)[None],
        lam,
    )

    def dense_objective(z):
        X = (U + scale * z) @ V
        cos = torch.sum(X * T) / (torch.linalg.matrix_norm(X) * torch.linalg.matrix_norm(T))
        return 1 - cos + lam * torch.sum((scale * z) ** 2)

    expected_gradient = torch.autograd.functional.jacobian(dense_objective, Z)
    assert math.isclose(float(value[0]), float(dense_objective(Z)), rel_tol=1e-12)
    torch.testing.assert_close(gradient[0], expected_gradient, rtol=1e-10, atol=1e-12)


def reference_target(initial, updates, module):
    """T = W_{t-1} + sum_i p_i (s_i B_i A_i - start_i) in float64, client by client, each client
    starting from the leading slice of its start rank."""
    start = initial[module]
    target = product(start).double()
    total = sum(u.num_examples for u in updates)
    for update in updates:
        r0 = update.start_rank(module)
        start_i = start.scale * start.B[:, :r0] @ start.A[:r0]
        target += update.num_examples / total * (product(update.modules[module]) - start_i).double()
    return target


def reference_objective(U, corrected, V, target, lam=0.01):
    """1 - cos(U' V, T) + lam ||U' - U||_F^2 in float64."""
    U, corrected, V = U.double(), corrected.double(), V.double()
    return 1 - cosine(corrected @ V, target) + lam * float(torch.sum((corrected - U) ** 2))


def reference_factors(initial, updates, module, steps=200, lam=0.01, lr=0.01):
    """LoRA-FAIR for one module written out with dense matrices in float64: FedAvg's folded
    (U, V); Q = [U, T V^T] W diag(lambda^-1/2) from the eigendecomposition W diag(lambda) W^T of
    the Gram matrix of [U, T V^T] (zero columns below 1e-12 of the largest lambda); torch's Adam on
    Z with dB = Q (s Z), s = rms(Q^T U), and autograd gradients of the dense objective
    1 - cos((U + dB) V, T) + lam ||dB||^2; the best iterate."""
    fedavg = aggregate("fedavg", initial, updates).state.factors[module]
    U, V = fedavg.U.double(), fedavg.V.double()
    target = reference_target(initial, updates, module)
    spanning = torch.cat([U, target @ V.T], dim=1)
    eigenvalues, eigenvectors = torch.linalg.eigh(spanning.T @ spanning)
    kept = eigenvalues > 1e-12 * eigenvalues.max()
    Q = spanning @ (eigenvectors * torch.where(kept, eigenvalues.clamp_min(1e-300).rsqrt(), 0.0))
    s = (Q.T @ U).pow(2).mean().sqrt()
    Z = torch.zeros(Q.shape[1], U.shape[1], dtype=U.dtype, requires_grad=True)
    adam = torch.optim.Adam([Z], lr=lr)
    best_value, best_Z = math.inf, None
    for step in range(steps + 1):
        dB = Q @ (s * Z)
        X = (U + dB) @ V
        cos = torch.sum(X * target) / (
            torch.linalg.matrix_norm(X) * torch.linalg.matrix_norm(target)
        )
        value = 1 - cos + lam * torch.sum(dB * dB)
        if value.item() < best_value:
            best_value, best_Z = value.item(), Z.detach().clone()
        if step == steps:
            break
        adam.zero_grad()
        value.backward()
        adam.step()
    return U + Q @ (s * best_Z)


def reference_case(dtype):
    """Mixed ranks, a client that started from more columns than it returns (HetLoRA's pruning),
    two modules of one shape and one of another; the factors in ``dtype``."""
    shapes = {"a": (12, 10), "b": (12, 10), "c": (9, 14)}
    initial, updates = federation(21, shapes, 6, [6, 2, 4, 6, 3], [30, 10, 25, 5, 40])
    pruned = updates[3]
    updates[3] = ClientUpdate(
        pruned.client_id,
        pruned.num_examples,
        {m: LoRAFactors(f.A[:4], f.B[:, :4], f.scale) for m, f in pruned.modules.items()},
        start_ranks=dict.fromkeys(shapes, 6),
    )

    def cast(factors):
        return LoRAFactors(factors.A.to(dtype), factors.B.to(dtype), factors.scale)

    initial = {m: cast(f) for m, f in initial.items()}
    updates = [
        ClientUpdate(
            u.client_id,
            u.num_examples,
            {m: cast(f) for m, f in u.modules.items()},
            start_ranks=u.start_ranks,
        )
        for u in updates
    ]
    return initial, updates


def relative_error(have, want):
    return float(torch.linalg.matrix_norm(have.double() - want) / torch.linalg.matrix_norm(want))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
def test_target_terms_from_factors_match_the_dense_target(dtype, tolerance):
    """T V^T, V V^T and ||T||_F of the stacked factors of T against the dense T."""
    initial, updates = reference_case(dtype)
    rule = make_rule("lorafair")
    state = rule.init_state(initial)
    batch = ClientUpdates(updates)
    averaged = aggregate("fedavg", initial, updates).state.factors
    for modules in (["a", "b"], ["c"]):
        previous = [state.factors[m] for m in modules]
        factors = lorafair.ideal_next_products(previous, batch, example_weights(batch), modules)
        V = torch.stack([averaged[m].V for m in modules])
        projected, gram, norm = lorafair.target_terms(V, *factors)
        for index, module in enumerate(modules):
            target, V_m = reference_target(initial, updates, module), V[index].double()
            assert projected.dtype == gram.dtype == norm.dtype == dtype
            assert relative_error(projected[index], target @ V_m.T) < tolerance
            assert relative_error(gram[index], V_m @ V_m.T) < tolerance
            dense_norm = torch.linalg.matrix_norm(target)
            assert abs(float(norm[index]) - dense_norm) < tolerance * dense_norm


@pytest.mark.parametrize(
    "dtype, objective_tolerance, factor_tolerance",
    [(torch.float64, 1e-13, 1e-11), (torch.float32, 1e-5, 1e-3)],
)
def test_matches_a_dense_reference(dtype, objective_tolerance, factor_tolerance):
    """The objective reached equals the float64 dense reference's within ``objective_tolerance``.
    The factors agree more loosely: Adam divides each coordinate's step by that coordinate's
    gradient size, so a small coordinate's round-off moves it at full step size (about 1e-12 in
    float64), and in float32 the objective's last steps differ by round-off, which then picks the
    best iterate (a few steps apart: about 1e-4)."""
    initial, updates = reference_case(dtype)
    result = aggregate("lorafair", initial, updates).state.factors
    fedavg = aggregate("fedavg", initial, updates).state.factors
    for module in ("a", "b", "c"):
        U, V = fedavg[module].U, fedavg[module].V
        assert torch.equal(result[module].V, V) and result[module].U.dtype == dtype
        want = reference_factors(initial, updates, module)
        target = reference_target(initial, updates, module)
        reached = reference_objective(U, result[module].U, V, target)
        best = reference_objective(U, want, V, target)
        assert abs(reached - best) < objective_tolerance, (module, reached - best)
        assert best < reference_objective(U, U, V, target) - 1e-3
        assert relative_error(result[module].U, want) < factor_tolerance


def test_modules_of_equal_shape_are_solved_together_as_if_alone(monkeypatch):
    shapes = {"a": (6, 5), "b": (6, 9), "c": (6, 2), "d": (4, 5)}
    initial, updates = federation(11, shapes, 3, [1, 3, 2], [3, 5, 7])
    batches = []
    solve = lorafair.solve_batch

    def recording(U, *args):
        batches.append(U.shape[0])
        return solve(U, *args)

    monkeypatch.setattr(lorafair, "solve_batch", recording)
    together = aggregate("lorafair", initial, updates)
    assert sorted(batches) == [1, 3]  # U is (6 x 3) for a, b, c and (4 x 3) for d
    for module in shapes:
        alone_initial = {module: initial[module]}
        alone_updates = [
            ClientUpdate(u.client_id, u.num_examples, {module: u.modules[module]}) for u in updates
        ]
        alone = aggregate("lorafair", alone_initial, alone_updates)
        for got, want in (
            (together.state.factors[module].U, alone.state.factors[module].U),
            (together.state.factors[module].V, alone.state.factors[module].V),
        ):
            assert torch.allclose(got, want, rtol=0, atol=1e-10)


def test_clients_start_from_the_corrected_slices_and_the_update_is_the_product_change():
    initial, updates = federation(5, {"q": (8, 6)}, 4, [4, 2], [1, 3])
    result = aggregate("lorafair", initial, updates)
    fedavg = aggregate("fedavg", initial, updates)
    U, V = result.state.factors["q"].U, result.state.factors["q"].V
    assert torch.equal(V, fedavg.state.factors["q"].V)
    assert not torch.allclose(U, fedavg.state.factors["q"].U)
    rule = make_rule("lorafair")
    scale = 8.0 / 2
    payload = rule.client_payload(result.state, ClientSpec(ranks={"q": 2}, scales={"q": scale}))
    local = rule.client_step(ClientState(adapter={"q": updates[1].modules["q"]}), payload)
    received = local.adapter["q"]
    assert torch.allclose(received.B, U[:, :2] / math.sqrt(scale), rtol=0, atol=1e-14)
    assert torch.allclose(received.A, V[:2] / math.sqrt(scale), rtol=0, atol=1e-14)
    change = result.global_update["q"].dense()
    assert torch.allclose(change, U @ V - product(initial["q"]), rtol=0, atol=1e-12)


def test_zero_steps_is_fedavg():
    initial, updates = federation(2, {"q": (5, 4)}, 3, [3, 1], [2, 2])
    fair = aggregate("lorafair", initial, updates, steps=0).state.factors["q"]
    fedavg = aggregate("fedavg", initial, updates).state.factors["q"]
    assert torch.equal(fair.U, fedavg.U) and torch.equal(fair.V, fedavg.V)


def test_zero_B_keeps_fedavgs_zero_factors():
    """Every B_i = 0 gives U = 0 while T = W_{t-1} - the start slices is not zero: no correction."""
    initial, updates = federation(4, {"q": (5, 4)}, 3, [1, 2], [2, 3])
    silent = [
        ClientUpdate(
            u.client_id,
            u.num_examples,
            {"q": LoRAFactors(u.modules["q"].A, 0 * u.modules["q"].B, u.modules["q"].scale)},
        )
        for u in updates
    ]
    assert torch.linalg.matrix_norm(dense_target(initial, silent, "q")) > 0
    factors = aggregate("lorafair", initial, silent).state.factors["q"]
    assert torch.equal(factors.U, torch.zeros(5, 3, dtype=DTYPE))


@pytest.mark.parametrize("options", [{"steps": -1}, {"lam": -0.1}, {"lr": 0.0}])
def test_bad_options_are_refused(options):
    with pytest.raises(ConfigError):
        make_rule("lorafair", **options)


def broken(updates, how):
    first = updates[0]
    if how == "modules":
        changed = ClientUpdate(first.client_id, first.num_examples, {"other": first.modules["q"]})
    elif how == "nan":
        f = first.modules["q"]
        changed = ClientUpdate(
            first.client_id, first.num_examples, {"q": LoRAFactors(f.A * math.nan, f.B, f.scale)}
        )
    else:
        changed = ClientUpdate(first.client_id, 0, first.modules)
    return [changed, *updates[1:]]


@pytest.mark.parametrize("how", ["modules", "nan", "examples"])
def test_bad_input_is_refused(how):
    initial, updates = federation(1, {"q": (4, 3)}, 2, [2, 1], [1, 1])
    with pytest.raises(InvalidUpdateError):
        aggregate("lorafair", initial, broken(updates, how))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_adam_loop_replayed_as_a_cuda_graph_is_the_eager_loop(monkeypatch):
    """On CUDA the Adam steps after the warm-up are one captured graph replayed: the same
    corrections as launching every step from Python (GRAPH_WARMUP above the steps)."""
    g = torch.Generator().manual_seed(3)
    M, d, r = 5, 48, 4
    U = (torch.randn(M, d, r, generator=g) * 1e-2).cuda()
    projected = torch.randn(M, d, r, generator=g).cuda()
    half = torch.randn(M, r, 7, generator=g).cuda()
    gram, target_norm = half @ half.mT, (torch.rand(M, generator=g) + 1).cuda()
    replayed = lorafair.solve_batch(U, projected, gram, target_norm, 50, 0.01, 0.01)
    monkeypatch.setattr(lorafair, "GRAPH_WARMUP", 1000)
    eager = lorafair.solve_batch(U, projected, gram, target_norm, 50, 0.01, 0.01)
    assert replayed.abs().max() > 0
    torch.testing.assert_close(replayed, eager, rtol=1e-6, atol=1e-9)
