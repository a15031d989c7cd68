"""What every aggregation rule shares: the global state, the client spec, the round result, the
example-weighted ideal update and the padded averaging of folded factors.

A rule takes the previous global state and the clients' updates and returns the next global state,
the payload each client must receive (shaped for its ranks) and the effective global update of the
round as factors, so that the deviation from the ideal update

    dW* = sum_i p_i dW_i,   dW_i = s_i (B_i A_i - B_i0 A_i0)   (p_i = n_i / sum n)

can be measured every round.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from fedlora.errors import ConfigError, InvalidUpdateError
from fedlora.lora.adapter import Adapter, LoRAFactors, ModuleUpdate
from fedlora.lora.client_state import ClientState
from fedlora.lora.lowrank import LowRank, stack
from fedlora.lora.measurement import worst
from fedlora.lora.server_optimizer import ServerOptimizer
from fedlora.lora.updates import (
    ClientUpdate,
    ClientUpdates,
    ConcatenatedFactors,
    check_module_subsets,
    check_same_modules,
    example_weights,
    moved_like,
    validate_updates,
)
from fedlora.lora.versioning import ChangeLog
from fedlora.rules.robust import Robustness, bounded_lora, robust_padded_rows, with_modules
from fedlora.wire.messages import (
    A_SUFFIX,
    B_SUFFIX,
    VERSION_KEY,
    Payload,
    adapter_config,
    adapter_from_tensors,
    adapter_to_tensors,
    to_wire,
)

if TYPE_CHECKING:
    from fedlora.config import RunConfig

ABSOLUTE_FLOOR = 1e-12
"""Below this size of both the ideal update and the clients' changes the deviation is 0 by definition."""


@dataclass(frozen=True)
class ClientSpec:
    """A client as the server knows it: its rank and scale per module, and the base version it holds."""

    ranks: dict[str, int]
    scales: dict[str, float]
    version: int = 0
    client: str = ""
    """The client's id as its updates carry it (the partition id): FSLoRA draws its sketch by it."""


@dataclass
class GlobalState:
    """The server's state after round ``version``.

    ``factors`` are the global folded factors (U = sqrt(s) B, V = sqrt(s) A) at the top rank;
    ``changes`` the per-round changes of the base (FedEx-LoRA, FLoRA); ``cores`` Fed-SB's R between
    its fixed factors ``sb_factors`` (U = B, V = A); ``optimizer`` the server optimizer's moments
    (`fedlora.lora.server_optimizer`).
    """

    version: int
    shapes: dict[str, tuple[int, int]]
    factors: dict[str, LowRank] = field(default_factory=dict)
    head: dict[str, Tensor] = field(default_factory=dict)
    changes: ChangeLog | None = None
    cores: dict[str, Tensor] = field(default_factory=dict)
    sb_factors: dict[str, LowRank] = field(default_factory=dict)
    optimizer: dict[str, Tensor] = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return sorted(self.shapes)

    def top_rank(self, module: str) -> int:
        return self.factors[module].inner_rank

    def state_dict(self) -> tuple[dict[str, Tensor], dict]:
        """The state as named tensors (``group/module/part``) and a JSON-able part, which
        `from_state_dict` turns back into an identical state (a checkpoint holds them)."""
        tensors: dict[str, Tensor] = {}
        for group, factors in (("factors", self.factors), ("sb_factors", self.sb_factors)):
            tensors.update(low_rank_tensors(group, factors))
        tensors.update({f"cores/{module}": core for module, core in self.cores.items()})
        tensors.update({f"head/{name}": t for name, t in self.head.items()})
        tensors.update({f"optimizer/{name}": t for name, t in self.optimizer.items()})
        changes = self.changes
        if changes is not None:
            first = changes.snapshot_version + 1
            for version, change in enumerate(changes.rounds, start=first):
                tensors.update(low_rank_tensors(f"changes/{version}", change))
            tensors.update({f"snapshot/{module}": t for module, t in changes.snapshot.items()})
        json_state = {
            "version": self.version,
            "shapes": {module: list(shape) for module, shape in self.shapes.items()},
            "changes": None if changes is None else changes.version,
            "changes_snapshot": None if changes is None else changes.snapshot_version,
        }
        return tensors, json_state

    @classmethod
    def from_state_dict(cls, tensors: Mapping[str, Tensor], json_state: Mapping) -> GlobalState:
        """The state `state_dict` described."""
        groups: dict[str, dict[str, Tensor]] = {}
        for key, tensor in tensors.items():
            group, name = key.split("/", 1)
            if group == "changes":
                version, name = name.split("/", 1)
                group = f"changes/{version}"
            groups.setdefault(group, {})[name] = tensor
        changes = None
        if json_state["changes"] is not None:
            snapshot = int(json_state.get("changes_snapshot") or 0)
            rounds = range(snapshot + 1, json_state["changes"] + 1)
            changes = ChangeLog(
                [low_rank_of(groups.get(f"changes/{t}", {})) for t in rounds],
                dict(groups.get("snapshot", {})),
                snapshot,
            )
        return cls(
            version=int(json_state["version"]),
            shapes={module: tuple(shape) for module, shape in json_state["shapes"].items()},
            factors=low_rank_of(groups.get("factors", {})),
            head=dict(groups.get("head", {})),
            changes=changes,
            cores=dict(groups.get("cores", {})),
            sb_factors=low_rank_of(groups.get("sb_factors", {})),
            optimizer=dict(groups.get("optimizer", {})),
        )


def low_rank_tensors(group: str, factors: Mapping[str, LowRank]) -> dict[str, Tensor]:
    """``{group}/{module}/U`` and ``.../V`` of each module's factors."""
    tensors = {}
    for module, f in factors.items():
        tensors[f"{group}/{module}/U"], tensors[f"{group}/{module}/V"] = f.U, f.V
    return tensors


def low_rank_of(tensors: Mapping[str, Tensor]) -> dict[str, LowRank]:
    """The factors `low_rank_tensors` named ``{module}/U`` and ``{module}/V`` (group removed)."""
    modules = sorted({name.rsplit("/", 1)[0] for name in tensors})
    return {module: LowRank(tensors[f"{module}/U"], tensors[f"{module}/V"]) for module in modules}


@dataclass
class RoundResult:
    """A round's outcome: the next state, the global model's change and the ideal change, per module.

    ``global_update`` and ``ideal_update`` are None for personalized methods (FedSA-LoRA).
    ``reference_norm`` is max(||dW*||, sum_i p_i ||dW_i||) per module. ``reconstructed``, where the
    global update is the ideal one by construction (FedEx-LoRA, FLoRA), holds per module the dense
    float64 update each rank class reconstructs from its payload (`fedlora.rules.reconstruction`).
    """

    state: GlobalState
    global_update: dict[str, LowRank] | None
    ideal_update: dict[str, LowRank] | None
    reference_norm: Mapping[str, float] | None
    reconstructed: Mapping[str, list[Tensor]] | None = None

    def relative_deviation(self) -> float | None:
        """max over modules (and rank classes, when reconstructed) of
        ||update - dW*||_F / max(||dW*||, sum_i p_i ||dW_i||) (dense; NaN if any is)."""
        if self.global_update is None or self.ideal_update is None or self.reference_norm is None:
            return None
        deviations = []
        for module, update in self.global_update.items():
            reference = self.reference_norm[module]
            if reference < ABSOLUTE_FLOOR:
                continue
            ideal = self.ideal_update[module]
            if self.reconstructed is None:
                differences = [stack([update, LowRank(-ideal.U, ideal.V)]).dense()]
            else:
                ideal_dense = ideal.U.double() @ ideal.V.double()
                differences = [measured - ideal_dense for measured in self.reconstructed[module]]
            deviations += [float(torch.linalg.matrix_norm(d)) / reference for d in differences]
        return worst(deviations)


class AggregationRule(ABC):
    """One federated LoRA method: server aggregation, client payload and client step, all pure."""

    name: ClassVar[str]
    exact: ClassVar[bool]
    personalized: ClassVar[bool] = False
    update_kind: ClassVar[type] = LoRAFactors
    scaled: ClassVar[bool] = True
    """Whether clients run their update at a LoRA scale alpha / r (restated in every reply)."""
    dp_scale_power: ClassVar[float] = 0.5
    """Client-level DP clips a LoRA factor's change times s_i ** this: the folded factors the
    rules sum (1/2); FFA-LoRA's G = s B (1)."""
    takes_server_optimizer: ClassVar[bool] = False
    """Whether the rule's update is a weighted sum of client tensors that it applies through a
    server optimizer (`fedlora.lora.server_optimizer`, the ``server_optimizer`` option)."""
    trains_A: ClassVar[bool] = True
    """Whether clients train A (FFA-LoRA freezes it: the client step leaves it trainable-off)."""
    bounds_norms: ClassVar[bool] = True
    """Whether the rule takes norm bounding of each client's change (`fedlora.rules.robust`)."""
    combinations: ClassVar[tuple[str, ...]] = ("mean",)
    """The combinations of client factors the rule takes: its own "mean", and where the rule
    averages factors coordinate-wise, "trimmed-mean" and "median"."""
    client_dp_refusal: ClassVar[str | None] = "its aggregate is not a sum of client tensors"
    """Why client-level DP is refused for the rule (`fedlora.privacy.client_level`), or None where its
    aggregate is a sum of client tensors, so that one clipped update bounds one client."""
    initial_training_rounds: ClassVar[int] = 0
    """Passes of ``local-steps`` batches a client takes on its data before round 1 (Fed-SB's
    gradient estimate), counted in its DP-SGD budget."""
    keeps_node_state: ClassVar[bool] = False
    """Whether a node keeps something of its own between rounds (FedSA-LoRA its B and head,
    Fed-SB its fixed factors, HetLoRA its pruned rank)."""
    allows_module_subsets: ClassVar[bool] = False
    """Whether clients may train different subsets of the global modules (LEGEND's LoRA depth):
    the rule then aggregates each module m over T_m, the clients that trained it, with the
    weights p_i / sum_{j in T_m} p_j. Otherwise a module set that differs is refused."""

    def client_ranks(
        self, rank: int, modules: Sequence[str], top_rank: int
    ) -> int | dict[str, int]:
        """The ranks a node of capacity class ``rank`` (its ``lora-rank`` or the rank profile's
        class) trains, given the model's adaptable ``modules`` and the run's top rank: that rank
        for every module, unless the rule configures modules itself (LEGEND)."""
        return rank

    def rank_refusal(
        self, ranks: Mapping[str, int], modules: Sequence[str], top_rank: int
    ) -> str | None:
        """Why a node's restated ranks are not a configuration the rule allows, or None: any
        ranks within 1..top_rank (checked elsewhere) for the rules that take a rank per node."""
        return None

    @classmethod
    def options_from(cls, config: RunConfig) -> dict:
        """The rule's options read from the run config (passed to its constructor)."""
        return {}

    def __init__(
        self, robustness: Robustness | None = None, server_optimizer: ServerOptimizer | None = None
    ):
        self.robustness = robustness or Robustness()
        check_robustness(type(self), self.robustness)
        self.server_optimizer = server_optimizer or ServerOptimizer()
        if not (self.takes_server_optimizer or self.server_optimizer.is_plain_average):
            raise ConfigError(f"strategy {self.name!r} does not take a server optimizer")

    def init_state(self, initial: Adapter, head: dict[str, Tensor] | None = None) -> GlobalState:
        """Round 0 from the common initial adapter (all clients start from its slices)."""
        return GlobalState(
            version=0,
            shapes={module: f.shape for module, f in initial.items()},
            factors={module: f.folded() for module, f in initial.items()},
            head=dict(head or {}),
        )

    def aggregate(self, state: GlobalState, updates: Sequence[ClientUpdate]) -> RoundResult:
        batch = ClientUpdates(updates)
        validate_updates(batch, self.update_kind, self.allows_module_subsets)
        self._check_against_state(state, batch)
        batch = ClientUpdates.of(self.completed_updates(state, batch))
        weights = example_weights(batch)
        if self.robustness.bounds_norms:
            batch = ClientUpdates(self.bounded_updates(state, batch))
        return self._aggregate(state, batch, weights)

    def completed_updates(
        self, state: GlobalState, updates: Sequence[ClientUpdate]
    ) -> Sequence[ClientUpdate]:
        """The validated updates as the rule aggregates them: what the clients sent, unless the
        rule adds what the server already holds (FFA-LoRA's frozen A)."""
        return updates

    def bounded_updates(
        self, state: GlobalState, updates: Sequence[ClientUpdate]
    ) -> list[ClientUpdate]:
        """Every client's change per module shrunk to the round's bound (`fedlora.rules.robust`)."""
        starts = self.client_starts(state)
        batch = ClientUpdates.of(updates)
        bounded: list[dict] = [{} for _ in updates]
        for module in state.modules:
            trainers = batch.trainers(module)
            if not trainers:
                continue
            norms = client_change_norms_per_client(starts[module], trainers, module).double()
            bound = self.robustness.bound(norms)
            where = [i for i, update in enumerate(updates) if module in update.modules]
            for i, norm in zip(where, norms.tolist()):
                bounded[i][module] = bounded_lora(updates[i], module, starts[module], norm, bound)
        return [with_modules(update, modules) for update, modules in zip(updates, bounded)]

    def client_starts(self, state: GlobalState) -> dict[str, LowRank | None]:
        """The folded global factors each client starts from, per module (None: a zero product)."""
        return {module: state.factors[module] for module in state.modules}

    @abstractmethod
    def _aggregate(
        self, state: GlobalState, updates: list[ClientUpdate], weights: Tensor
    ) -> RoundResult:
        """The method's own rule."""

    @abstractmethod
    def client_payload(self, state: GlobalState, spec: ClientSpec) -> Payload:
        """What the server sends to one client, shaped for its ranks."""

    @abstractmethod
    def client_step(self, local: ClientState, payload: Payload, cache=None) -> ClientState:
        """What a client does with its payload before it trains or evaluates."""

    def client_reply(self, trained: Adapter, lora_alpha: float, rslora: bool) -> Adapter:
        """What a client sends of its trained adapter (peft's ``lora_alpha`` and rsLoRA give its
        scale): the adapter as trained."""
        return trained

    def global_delta(self, state: GlobalState, module: str) -> LowRank:
        """The global model's weight minus the pretrained one, at the top rank."""
        return state.factors[module]

    def reply_shapes(
        self, state: GlobalState, ranks: Mapping[str, int]
    ) -> dict[str, tuple[int, ...]]:
        """The update tensors a client of these ranks sends back, by key, with their shapes:
        ``lora_A`` (r x d_in) and ``lora_B`` (d_out x r) per module (per module of ``ranks``, where
        the rule allows module subsets)."""
        shapes: dict[str, tuple[int, ...]] = {}
        for module, (d_out, d_in) in state.shapes.items():
            if self.allows_module_subsets and module not in ranks:
                continue
            shapes[module + A_SUFFIX] = (ranks[module], d_in)
            shapes[module + B_SUFFIX] = (d_out, ranks[module])
        return shapes

    def _check_against_state(self, state: GlobalState, updates: Sequence[ClientUpdate]) -> None:
        """Updates must adapt the state's modules (a subset of them, where the rule allows
        module subsets), with its shapes, at no more than its rank. Of updates that passed
        `validate_updates` (one outer shape per module), each module's first update is checked
        against the global shape and the largest start rank against the global rank; where one
        fails, the update and module are found one by one."""
        if self.allows_module_subsets:
            check_module_subsets(state.shapes, updates)
        else:
            check_same_modules(state.shapes, updates)
        global_factors = state.factors or state.sb_factors
        batch = ClientUpdates.of(updates)
        for module in batch.modules():
            trainers = batch.trainers(module)
            fits = fits_shape(trainers[0].modules[module], state.shapes[module])
            top = global_factors[module].inner_rank if module in global_factors else None
            if not fits or (top is not None and max(trainers.start_ranks(module)) > top):
                refuse_against_state(state.shapes, global_factors, updates)


def fits_shape(factors: ModuleUpdate, shape: tuple[int, int]) -> bool:
    """Whether a module update's A (where it sends one) has d_in columns and its B d_out rows."""
    d_out, d_in = shape
    fits = factors.A.shape[1] == d_in if hasattr(factors, "A") else True
    return fits and (factors.B.shape[0] == d_out if hasattr(factors, "B") else True)


def refuse_against_state(
    shapes: Mapping[str, tuple[int, int]],
    global_factors: Mapping[str, LowRank],
    updates: Sequence[ClientUpdate],
) -> None:
    """Raise on the first update and module, update by update, whose shape is not the global one
    or whose start rank is above the global rank."""
    for update in updates:
        for module, factors in update.modules.items():
            if not fits_shape(factors, shapes[module]):
                raise InvalidUpdateError(
                    f"client {update.client_id!r}: module {module!r} does not have the global "
                    f"shape {tuple(shapes[module])} (d_out, d_in)"
                )
            if module not in global_factors:
                continue
            top = global_factors[module].inner_rank
            if update.start_rank(module) > top:
                raise InvalidUpdateError(
                    f"client {update.client_id!r}: module {module!r} has rank "
                    f"{update.start_rank(module)} above the global rank {top}"
                )


class SeededRule(AggregationRule):
    """A rule whose random draws come from a ``seed`` option, the run's seed (FFA-LoRA's frozen
    A, FSLoRA's sketches), shared by the server and every client."""

    def __init__(
        self,
        seed: int = 0,
        server_optimizer: ServerOptimizer | None = None,
        robustness: Robustness | None = None,
    ):
        super().__init__(robustness, server_optimizer)
        self.seed = seed

    @classmethod
    def options_from(cls, config: RunConfig) -> dict:
        return {"seed": config.seed}


def check_robustness(rule: type[AggregationRule], robustness: Robustness) -> None:
    """Refuse options the rule does not declare, naming the rule and the key."""
    if robustness.bounds_norms and not rule.bounds_norms:
        raise ConfigError(
            f"strategy {rule.name!r} does not take robust-norm-bound / -median-multiple"
        )
    if robustness.combination not in rule.combinations:
        raise ConfigError(
            f"robust-aggregation = {robustness.combination!r} does not apply to strategy "
            f"{rule.name!r}; it takes {list(rule.combinations)}"
        )


# ---- shared plumbing ------------------------------------------------------------------------------


def concatenate_folded(updates: Sequence[ClientUpdate], module: str) -> ConcatenatedFactors:
    """sqrt(s_i) B_i and sqrt(s_i) A_i of all clients in two concatenations (no per-client products);
    built once per round and module when ``updates`` is the round's `ClientUpdates`."""
    return ClientUpdates.of(updates).concatenated(module)


def padded_averages(
    updates: Sequence[ClientUpdate],
    weights: Tensor | Mapping[str, Tensor],
    ranks: Mapping[str, int],
) -> dict[str, LowRank]:
    """sum_i w_i pad(sqrt(s_i) B_i), sum_i w_i pad(sqrt(s_i) A_i), zero-padded to ``ranks[module]``,
    for every module the updates concatenate (`ClientUpdates.groups`; ``ranks`` names them all, in
    the order of the result), with ``weights`` one per client or, per module, one per client: one
    product per factor for each group (`padded_sums`)."""
    batch = ClientUpdates.of(updates)
    averages = {}
    for group in batch.groups():
        c = batch.stacked(group)
        w = weights if isinstance(weights, Tensor) else torch.stack([weights[m] for m in group])
        U, V = padded_sums(c, moved_like(w, c.U)[..., c.client], max(ranks[m] for m in group))
        for index, module in enumerate(group):
            rank = ranks[module]
            averages[module] = LowRank(U[index, :, :rank], V[index, :rank])
    return {module: averages[module] for module in ranks}


def padded_sums(c: ConcatenatedFactors, w: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """sum_i w_i pad(sqrt(s_i) B_i) and sum_i w_i pad(sqrt(s_i) A_i) of a stacked group's modules
    (M x d_out x rank, M x rank x d_in), from the weight ``w`` of each rank column (one row for
    every module, or one per module): products with the matrix that puts column j, weighted, at
    its position."""
    spread = torch.nn.functional.one_hot(c.position, rank).to(w.dtype)
    placed = w[..., None] * spread
    return c.U @ placed, placed.mT @ c.V


def robust_padded_factors(
    updates: Sequence[ClientUpdate], module: str, rank: int, robustness: Robustness
) -> LowRank:
    """The coordinate-wise median or trimmed mean of the clients' padded folded factors."""
    folded = [update.modules[module].folded() for update in updates]
    combine = robustness.combination, robustness.trim_fraction
    U = robust_padded_rows([f.U.T for f in folded], rank, *combine).T
    return LowRank(U, robust_padded_rows([f.V for f in folded], rank, *combine))


def start_coverage(
    updates: Sequence[ClientUpdate], weights: Tensor, module: str, rank: int
) -> Tensor:
    """c_k = sum of p_i over the clients whose start rank r_i0 exceeds k."""
    return coverage_of_ranks(ClientUpdates.of(updates).start_ranks(module), weights, rank)


def start_coverages(
    updates: Sequence[ClientUpdate], weights: Tensor, modules: Sequence[str], rank: int
) -> Tensor:
    """`start_coverage` of each of ``modules`` (M x rank), computed once per distinct start ranks."""
    batch = ClientUpdates.of(updates)
    start_ranks = [batch.start_ranks(module) for module in modules]
    computed = {r: coverage_of_ranks(r, weights, rank) for r in dict.fromkeys(start_ranks)}
    return torch.stack([computed[r] for r in start_ranks])


def coverage_of_ranks(start_ranks: Sequence[int], weights: Tensor, rank: int) -> Tensor:
    """c_k = sum of p_i over the i with start_ranks[i] > k, k < rank."""
    started = torch.arange(rank)[None, :] < torch.tensor(start_ranks)[:, None]
    return weights @ started.to(weights.dtype)


def ideal_update(
    previous: LowRank | None, updates: Sequence[ClientUpdate], weights: Tensor, module: str
) -> LowRank:
    """dW* = sum_i p_i (s_i B_i A_i - U[:, :r_i0] V[:r_i0]) as stacked factors.

    Every client started from the leading r_i0 columns/rows of the previous folded global factors
    (``previous``; None when clients start from a zero product, as FLoRA's do). The start terms sum to
    U diag(c) V with c_k = sum of p_i over the clients with r_i0 > k, so the result has inner rank
    sum_i r_i + r.
    """
    c = concatenate_folded(updates, module)
    p = moved_like(weights, c.V)[c.client]
    if previous is None:
        return LowRank(c.U, c.V * p[:, None])
    coverage = moved_like(start_coverage(updates, weights, module, previous.inner_rank), previous.V)
    return LowRank(
        torch.cat([c.U, previous.U], dim=1),
        torch.cat([c.V * p[:, None], -coverage[:, None] * previous.V], dim=0),
    )


def ideal_updates(
    starts: Mapping[str, LowRank | None], updates: Sequence[ClientUpdate], weights: Tensor
) -> dict[str, LowRank]:
    """`ideal_update` of every module the updates concatenate (``starts`` holds each one's previous
    factors), the modules of a group (`ClientUpdates.groups`) whose previous factors have one inner
    rank at once: one product with p per group, the previous factors stacked, c once per distinct
    start ranks, one concatenation per factor; each module's factors are views of the group's."""
    batch = ClientUpdates.of(updates)
    ideal = {}
    for group in batch.groups():
        previous = [starts[module] for module in group]
        if len({None if p is None else p.inner_rank for p in previous}) > 1:
            ideal.update({m: ideal_update(starts[m], batch, weights, m) for m in group})
            continue
        c = batch.stacked(group)
        U, V = c.U, c.V * moved_like(weights, c.V)[c.client][:, None]
        if previous[0] is not None:
            start_U, start_V = (
                torch.stack([p.U for p in previous]),
                torch.stack([p.V for p in previous]),
            )
            covered = start_coverages(batch, weights, group, start_V.shape[1])
            U = torch.cat([U, start_U], dim=2)
            V = torch.cat([V, -moved_like(covered, start_V)[:, :, None] * start_V], dim=1)
        ideal.update({module: LowRank(U[i], V[i]) for i, module in enumerate(group)})
    return ideal


def padded_per_client(values: Tensor, c: ConcatenatedFactors, rank: int) -> Tensor:
    """(sum r_i x d) rows regrouped as (K x rank x d), zero-padded."""
    out = values.new_zeros(c.num_clients, rank, values.shape[1])
    out[c.client, c.position] = values
    return out


def client_change_norms_per_client(
    previous: LowRank | None, updates: Sequence[ClientUpdate], module: str
) -> Tensor:
    """||dW_i||_F per client, dW_i = s_i B_i A_i - U[:, :r_i0] V[:r_i0] (previous None: no start
    term), from batched r x r Grams: ||dW_i||^2 = ||P_i||^2 - 2 <P_i, P0_i> + ||P0_i||^2."""
    c = concatenate_folded(updates, module)
    batch = ClientUpdates.of(updates)
    rank = max(batch.ranks(module))
    Bt, A = padded_per_client(c.U.T, c, rank), padded_per_client(c.V, c, rank)
    squared = torch.sum((Bt @ Bt.mT) * (A @ A.mT), dim=(1, 2))
    if previous is not None:
        start_ranks = torch.tensor(batch.start_ranks(module)).to(c.U.device, non_blocking=True)
        top = previous.inner_rank
        kept = torch.arange(top, device=c.U.device)[None, :] < start_ranks[:, None]
        start_gram = (previous.U.T @ previous.U) * (previous.V @ previous.V.T)
        pair = kept[:, :, None] & kept[:, None, :]
        squared = squared + torch.sum(start_gram[None] * pair, dim=(1, 2))
        cross = (Bt @ previous.U) * (A @ previous.V.T)
        squared = squared - 2 * torch.sum(cross * kept[:, None, :], dim=(1, 2))
    return squared.clamp_min(0).sqrt()


def client_change_norms(
    previous: LowRank | None, updates: Sequence[ClientUpdate], weights: Tensor, module: str
) -> float:
    """sum_i p_i ||dW_i||_F."""
    return weighted_sum(weights, client_change_norms_per_client(previous, updates, module))


def weighted_sum(weights: Tensor, values: Tensor) -> float:
    """sum_i p_i v_i, on the values' device and dtype."""
    return float(weights.to(values) @ values)


class NormsOnUse(Mapping):
    """A norm per module, computed when first read (a measurement, not part of the aggregation)."""

    def __init__(self, modules: Iterable[str], compute: Callable[[str], float]):
        self._modules, self._compute = list(modules), compute
        self._cache: dict[str, float] = {}

    def __getitem__(self, module: str) -> float:
        if module not in self._cache:
            self._cache[module] = self._compute(module)
        return self._cache[module]

    def __iter__(self):
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


class ReferenceNorms(NormsOnUse):
    """max(||dW*||, sum_i p_i ||dW_i||) per module, computed on first use.

    By the triangle inequality ||dW*|| <= sum_i p_i ||dW_i||, so the sum is the maximum.
    """

    def __init__(self, starts: dict[str, LowRank | None], updates, weights: Tensor):
        super().__init__(
            starts, lambda module: client_change_norms(starts[module], updates, weights, module)
        )


def ideal_and_reference(
    starts: dict[str, LowRank | None], updates: Sequence[ClientUpdate], weights: Tensor
) -> tuple[dict[str, LowRank], ReferenceNorms]:
    """The ideal update per module (`ideal_updates`), and its reference norms (computed when first
    read)."""
    ideal = ideal_updates(starts, updates, weights)
    return {module: ideal[module] for module in starts}, ReferenceNorms(starts, updates, weights)


class TrainerReferenceNorms(NormsOnUse):
    """max(||dW*_m||, sum_{i in T_m} p_i/P_m ||dW_i||) per module m over T_m, the clients that
    trained it (0 where nobody did), computed on first use."""

    def __init__(self, starts: dict[str, LowRank | None], updates: Sequence[ClientUpdate]):
        batch = ClientUpdates.of(updates)

        def norms(module: str) -> float:
            trainers = batch.trainers(module)
            if not trainers:
                return 0.0
            return client_change_norms(starts[module], trainers, example_weights(trainers), module)

        super().__init__(starts, norms)


def ideal_over_trainers(
    starts: dict[str, LowRank | None],
    updates: Sequence[ClientUpdate],
    shapes: Mapping[str, tuple[int, int]],
) -> tuple[dict[str, LowRank], TrainerReferenceNorms]:
    """Per module m, dW*_m = sum_{i in T_m} p_i dW_{i,m} / sum_{i in T_m} p_i over the clients
    that trained it (a zero update where nobody did), and its reference norms; the modules of one
    T_m together (`ideal_updates`)."""
    batch = ClientUpdates.of(updates)
    ideal = {}
    for trainers, modules in batch.by_trainers(starts):
        if trainers:
            ideal.update(ideal_updates(starts, trainers, example_weights(trainers)))
            continue
        for module in modules:
            previous = starts[module]
            like = previous.U if previous is not None else any_update_tensor(batch)
            ideal[module] = zero_update(shapes[module], like)
    return {module: ideal[module] for module in starts}, TrainerReferenceNorms(starts, batch)


def any_update_tensor(updates: Sequence[ClientUpdate]) -> Tensor:
    """A tensor of the updates (for their dtype and device): the first factor of the first one."""
    factors = next(iter(updates[0].modules.values()))
    return factors.A if hasattr(factors, "A") else factors.B


def zero_update(shape: tuple[int, int], like: Tensor) -> LowRank:
    """A module's zero change (inner rank 1), in the dtype and on the device of ``like``."""
    d_out, d_in = shape
    return LowRank(like.new_zeros(d_out, 1), like.new_zeros(1, d_in))


def trained_factors(factors: Mapping[str, LowRank], spec: ClientSpec) -> dict[str, LowRank]:
    """The global factors of the modules the client adapts (every module, but for a rule that
    allows module subsets), in the state's module order."""
    return {module: f for module, f in factors.items() if module in spec.ranks}


def difference(new: LowRank, old: LowRank) -> LowRank:
    """new - old as stacked factors."""
    return stack([new, LowRank(-old.U, old.V)])


def sliced_adapter(factors: dict[str, LowRank], spec: ClientSpec) -> Adapter:
    """The client's leading slices of folded global factors with its own sqrt(s_i) divided out."""
    adapter: Adapter = {}
    for module, folded in factors.items():
        rank = spec.ranks[module]
        if rank > folded.inner_rank:
            raise InvalidUpdateError(
                f"module {module!r}: client rank {rank} above the global rank {folded.inner_rank}"
            )
        adapter[module] = LoRAFactors.from_folded(folded, rank, spec.scales[module])
    return adapter


def adapter_payload(state: GlobalState, spec: ClientSpec, with_head: bool = True) -> Payload:
    adapter = sliced_adapter(state.factors, spec)
    config = {**adapter_config(adapter), VERSION_KEY: state.version}
    head = {name: to_wire(t) for name, t in state.head.items()} if with_head else {}
    return Payload(adapter=adapter_to_tensors(adapter), head=head, config=config)


def load_adapter(local: ClientState, payload: Payload) -> ClientState:
    """Replace the client's adapter (and head, when sent) by the payload's, in the client's dtype."""
    dtype = next(iter(local.adapter.values())).A.dtype if local.adapter else None
    adapter = adapter_from_tensors(payload.adapter, payload.config, dtype=dtype)
    head = {name: t.to(dtype) if dtype else t for name, t in payload.head.items()} or local.head
    return replace(local, adapter=adapter, head=head)
