"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018) over clients of mixed ranks.

A client's *update* is what the server adds for it, in the client's own shapes: the change of its
folded factors from the slice it received, sqrt(s_i) (B_i - B_i0) (d_out x r_i) and
sqrt(s_i) (A_i - A_i0) (r_i x d_in) for FedAvg, the A part alone for FedSA-LoRA, R_i - R_{t-1}
(r x r, zero outside the client's block) for Fed-SB, and the change of the trained head where the
head is shared. Its L2 norm over all of these together is clipped to C. The folded change is the
one the server sums: clipping the raw sqrt(s_i)-free change instead would let a client of a larger
scale alpha / r_i move the aggregate by more than C.

The server's step, in update form, on every coordinate of the global tensors (top-rank shapes):

    X_t = X_{t-1} + (1/n) sum_i pad(clip_C(u_i)) + N(0, (sigma C / n)^2)

``pad`` places a client's update in the leading block (zero rows/columns above its rank), which
keeps its norm, so one client moves the sum by at most C whatever its rank. Every client weighs
1/n, n being the number of clients *sampled* for the round (fixed before any reply; a lost reply
counts as a zero update): the sensitivity is then C / n, the value the noise is calibrated to.
FedAvg's example weights p_i = n_i / sum n would make it max_i p_i C, which depends on the clients'
private data sizes. With mixed ranks the update form is not the non-private padded average of the
factors: that one is sum_i pad(F_i) / n = diag(c) X_{t-1} + sum_i pad(u_i) / n, whose coverage
c_k (the share of clients of rank above k) changes when one client joins, by more than C / n.
With equal ranks and every sampled reply in, the two coincide.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from fedlora.errors import ConfigError
from fedlora.lora.lowrank import LowRank
from fedlora.lora.updates import ClientUpdate, ClientUpdates, validate_updates
from fedlora.rules import RULES
from fedlora.rules.base import AggregationRule, GlobalState, RoundResult, difference

CLIP_KEY = "dp-client-clip"
"""Config key of a train message: the bound the client clips its update to (absent: no clipping)."""
UPDATE_NORM_KEY = "update-norm"
"""Metric of a train reply: the norm of the client's update before it clipped it."""


def check_client_dp_rule(name: str) -> None:
    """Refuse client-level DP for a rule that declares why its aggregate is not bounded by one
    clipped update (`AggregationRule.client_dp_refusal`)."""
    reason = RULES[name].client_dp_refusal
    if reason is not None:
        supported = [rule for rule, cls in RULES.items() if cls.client_dp_refusal is None]
        raise ConfigError(
            f"dp-client is not available for strategy {name!r}: {reason}, so one client's "
            "influence on the aggregate is not bounded by its clipped update (no sensitivity "
            f"is derived for it); use one of {supported}"
        )


def l2_norm(tensors: Mapping[str, Tensor]) -> float:
    """The L2 norm of all the tensors together, as one flat vector (in float64)."""
    if not tensors:
        return 0.0
    norms = torch.stack([torch.linalg.vector_norm(t.double()).cpu() for t in tensors.values()])
    return float(torch.linalg.vector_norm(norms))


def clip_to_norm(tensors: Mapping[str, Tensor], clip: float) -> tuple[dict[str, Tensor], float]:
    """The tensors scaled by min(1, C / ||tensors||) (one norm over all of them), and that norm."""
    norm = l2_norm(tensors)
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return {key: t * factor for key, t in tensors.items()}, norm


def clip_reply(
    sent: Mapping[str, Tensor],
    received: Mapping[str, Tensor],
    folds: Mapping[str, float],
    clip: float,
) -> tuple[dict[str, Tensor], float]:
    """What a client sends with its update clipped: received + clip_C(f (sent - received)) / f per
    key, f its fold (sqrt(s_i) for LoRA factors, 1 for Fed-SB's R and the head); and the norm of
    the update before clipping. Every key sent must have been received."""
    missing = sorted(set(sent) - set(received))
    if missing:
        raise KeyError(f"no received tensor to take the update of {missing} from")
    update = {key: folds.get(key, 1.0) * (t - received[key].to(t)) for key, t in sent.items()}
    clipped, norm = clip_to_norm(update, clip)
    return {key: received[key].to(t) + t / folds.get(key, 1.0) for key, t in clipped.items()}, norm


# ---- server side ---------------------------------------------------------------------------------


def client_tensors(update: ClientUpdate) -> dict[str, Tensor]:
    """What a client's reply adds to the sum, in its own shapes: ``{module}.{factor}`` for what its
    update kind sums (``summed``: folded B and A, FedSA-LoRA's folded A, Fed-SB's R, FFA-LoRA's
    s_i B_i in its coordinates G), and the head."""
    tensors = {
        f"{module}.{name}": tensor
        for module, factors in update.modules.items()
        for name, tensor in factors.summed().items()
    }
    return {**tensors, **update.head}


def global_tensors(state: GlobalState) -> dict[str, Tensor]:
    """The global state in `client_tensors`' keys, at the top rank."""
    tensors: dict[str, Tensor] = {}
    for module, folded in state.factors.items():
        tensors[f"{module}.B"], tensors[f"{module}.A"] = folded.U, folded.V
    for module, core in state.cores.items():
        tensors[f"{module}.R"] = core
    return {**tensors, **state.head}


def leading(shape: torch.Size) -> tuple[slice, ...]:
    """The leading block of a tensor of this shape inside a larger one (zero padding)."""
    return tuple(slice(0, size) for size in shape)


def own_update(state: GlobalState, update: ClientUpdate) -> dict[str, Tensor]:
    """The client's update in its own shapes: what it sent minus its slice of the global state."""
    current = global_tensors(state)
    return {
        key: t - current[key][leading(t.shape)].to(t) for key, t in client_tensors(update).items()
    }


def gaussian_noise(shape: torch.Size, std: float, generator: torch.Generator) -> Tensor:
    """N(0, std^2) of this shape in float64, drawn on the CPU from ``generator``."""
    return torch.randn(shape, generator=generator, dtype=torch.float64) * std


@dataclass
class PrivateRound:
    """A round's private aggregate, and what the clipping did: every update's norm before the
    server clipped it again (a client that clipped sends one at most C, up to rounding)."""

    result: RoundResult
    update_norms: list[float]


def private_round(
    rule: AggregationRule,
    state: GlobalState,
    updates: Sequence[ClientUpdate],
    num_sampled: int,
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> PrivateRound:
    """X_t = X_{t-1} + (1/n) sum_i pad(clip_C(u_i)) + N(0, (sigma C / n)^2) on every global
    coordinate the clients train (n = ``num_sampled``); see the module's docstring.

    The updates are validated as the rule's own ``aggregate`` does; they are clipped again here, so
    the bound holds for a client that did not clip. Noise is drawn in the order of the sorted keys.
    ``ideal_update`` is None: the private aggregate has no deviation to measure against the
    non-private ideal.
    """
    check_client_dp_rule(rule.name)
    if num_sampled < len(updates):
        raise ValueError(f"{len(updates)} updates from only {num_sampled} sampled clients")
    batch = ClientUpdates(updates)
    validate_updates(batch, rule.update_kind)
    rule._check_against_state(state, batch)
    current = global_tensors(state)
    sums: dict[str, Tensor] = {}
    norms = []
    for update in batch:
        clipped, norm = clip_to_norm(own_update(state, update), clip)
        norms.append(norm)
        for key, t in clipped.items():
            total = sums.setdefault(key, torch.zeros_like(current[key], dtype=torch.float64))
            total[leading(t.shape)] += t.double()
    std = noise_multiplier * clip / num_sampled
    new = {
        key: current[key]
        + (sums[key] / num_sampled + gaussian_noise(sums[key].shape, std, generator)).to(
            current[key]
        )
        for key in sorted(sums)
    }
    next_state = with_tensors(state, new)
    global_update = None
    if not rule.personalized:
        global_update = {
            module: difference(
                rule.global_delta(next_state, module), rule.global_delta(state, module)
            )
            for module in state.modules
        }
    return PrivateRound(RoundResult(next_state, global_update, None, None), norms)


def with_tensors(state: GlobalState, new: Mapping[str, Tensor]) -> GlobalState:
    """The next version of ``state`` with the tensors in ``new`` (`global_tensors`' keys) replaced."""
    factors = {
        module: LowRank(new.get(f"{module}.B", folded.U), new.get(f"{module}.A", folded.V))
        for module, folded in state.factors.items()
    }
    cores = {module: new.get(f"{module}.R", core) for module, core in state.cores.items()}
    head = {name: new.get(name, t) for name, t in state.head.items()}
    return replace(state, version=state.version + 1, factors=factors, cores=cores, head=head)


def private_mean(
    estimates: Sequence[Mapping[str, Tensor]],
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> tuple[dict[str, Tensor], list[float]]:
    """(1/n) sum_i clip_C(e_i) + N(0, (sigma C / n)^2) over n estimates of the same shapes (Fed-SB's
    gradient estimates), and their norms before clipping."""
    clipped = [clip_to_norm(estimate, clip) for estimate in estimates]
    n, std = len(estimates), noise_multiplier * clip / len(estimates)
    mean = {}
    for key in sorted(estimates[0]):
        total = torch.stack([c[key].double() for c, _ in clipped]).sum(dim=0)
        noise = gaussian_noise(total.shape, std, generator)
        mean[key] = (total / n + noise).to(estimates[0][key])
    return mean, [norm for _, norm in clipped]
