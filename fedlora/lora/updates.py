"""Client updates as the rules receive them, their validation and the example weights p_i."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat

import torch
from torch import Tensor

from fedlora.errors import InvalidUpdateError
from fedlora.lora.adapter import LoRAFactors, ModuleUpdate


@dataclass(frozen=True)
class ClientUpdate:
    """One client's reply: its trained module factors, trained head and example count.

    ``start_ranks`` are the ranks the client received this round where they differ from its current
    ones (HetLoRA clients prune ranks during training); by default the ranks did not change.
    """

    client_id: str
    num_examples: int
    modules: Mapping[str, ModuleUpdate]
    head: Mapping[str, Tensor] = field(default_factory=dict)
    start_ranks: Mapping[str, int] = field(default_factory=dict)

    def start_rank(self, module: str) -> int:
        rank = self.start_ranks.get(module)
        return self.modules[module].rank if rank is None else rank

    def tensors(self) -> dict[str, Tensor]:
        named: dict[str, Tensor] = {}
        for module, factors in self.modules.items():
            for attr in ("A", "B", "R"):
                if hasattr(factors, attr):
                    named[f"{module}.{attr}"] = getattr(factors, attr)
        named.update(self.head)
        return named


@dataclass(frozen=True)
class ConcatenatedFactors:
    """Every client's folded factors of one module side by side, one rank column per entry; or of
    a group of modules with the same client ranks and shape, stacked over a leading module axis.

    U is (d_out x sum r_i), V is (sum r_i x d_in) (M x d_out x sum r_i and M x sum r_i x d_in for M
    modules); ``client[j]`` owns column j, which is column ``position[j]`` of that client's own
    factors, and ``roots[j]`` (``roots[m, j]``) is sqrt(s_i) of that client.
    """

    U: Tensor
    V: Tensor
    client: Tensor
    position: Tensor
    num_clients: int
    roots: Tensor

    def of_module(self, index: int) -> ConcatenatedFactors:
        """The ``index``-th module of a stacked group (views)."""
        return ConcatenatedFactors(
            self.U[index],
            self.V[index],
            self.client,
            self.position,
            self.num_clients,
            self.roots[index],
        )


class ClientUpdates(list):
    """A round's updates with what the rules read per module built once: the ranks (those of every
    module the batch concatenates read in one pass over the updates), the start ranks (the ranks,
    where no update restates its start ranks), and the concatenated folded factors with their index
    tensors (made on the factors' device without host synchronisation, once per rank pattern). The
    batch's modules (``modules``; by default those every update trains) of the same client ranks
    and shape are concatenated together, in one stack (`stacked`)."""

    def __init__(self, updates: Sequence[ClientUpdate], modules: Sequence[str] | None = None):
        super().__init__(updates)
        self._modules = modules
        self._concatenated: dict[str, ConcatenatedFactors] = {}
        self._stacked: dict[tuple[str, ...], ConcatenatedFactors] = {}
        self._groups: list[tuple[str, ...]] | None = None
        self._ranks: dict[str, tuple[int, ...]] | None = None
        self._start_ranks: dict[str, tuple[int, ...]] = {}
        self._indices: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._trainers: dict[str, ClientUpdates] | None = None
        self._restates_start_ranks: bool | None = None

    @classmethod
    def of(cls, updates: Sequence[ClientUpdate]) -> ClientUpdates:
        return updates if isinstance(updates, ClientUpdates) else cls(updates)

    def ranks(self, module: str) -> tuple[int, ...]:
        """The clients' ranks of ``module``, in the batch's order."""
        if self._ranks is None:
            modules = self.concatenated_modules()
            rows = [[update.modules[m].rank for m in modules] for update in self]
            self._ranks = dict(zip(modules, zip(*rows)))
        if module not in self._ranks:
            self._ranks[module] = tuple(update.modules[module].rank for update in self)
        return self._ranks[module]

    def start_ranks(self, module: str) -> tuple[int, ...]:
        """The ranks the clients received of ``module`` (`ClientUpdate.start_rank`)."""
        if self._restates_start_ranks is None:
            self._restates_start_ranks = any(update.start_ranks for update in self)
        if not self._restates_start_ranks:
            return self.ranks(module)
        if module not in self._start_ranks:
            self._start_ranks[module] = tuple(update.start_rank(module) for update in self)
        return self._start_ranks[module]

    def trainers(self, module: str) -> ClientUpdates:
        """T_m: the updates that trained ``module`` (all of them where every client trains every
        module), as a batch of their own, one for all the modules of the same T_m: their weights,
        renormalised, are p_i / sum_{T_m} p_j. Empty for a module nobody trained."""
        if self._trainers is None:
            self._trainers = self._trainer_batches()
        return self._trainers.get(module) or ClientUpdates([])

    def _trainer_batches(self) -> dict[str, ClientUpdates]:
        """Every trained module's T_m: this batch for the modules every update trains."""
        sets: dict[tuple[bool, ...], list[str]] = {}
        for module in self.modules():
            sets.setdefault(tuple(module in update.modules for update in self), []).append(module)
        batches = {}
        for trained, modules in sets.items():
            members = [update for update, took in zip(self, trained) if took]
            batch = self if all(trained) else ClientUpdates(members, modules)
            batches.update(dict.fromkeys(modules, batch))
        return batches

    def by_trainers(self, modules: Iterable[str]) -> list[tuple[ClientUpdates, list[str]]]:
        """``modules`` grouped by T_m (`trainers`), in the order of first appearance."""
        groups: dict[int, tuple[ClientUpdates, list[str]]] = {}
        for module in modules:
            trainers = self.trainers(module)
            groups.setdefault(id(trainers), (trainers, []))[1].append(module)
        return list(groups.values())

    def modules(self) -> list[str]:
        """Every module some update trained."""
        return sorted({module for update in self for module in update.modules})

    def concatenated_modules(self) -> list[str]:
        """The batch's modules: ``modules`` as given, by default those every update trains."""
        if self._modules is None:
            self._modules = [m for m in self.modules() if all(m in u.modules for u in self)]
        return self._modules

    def groups(self) -> list[tuple[str, ...]]:
        """The batch's modules grouped by the clients' ranks and the shape, dtype and device of the
        first client's factors: the modules concatenated together."""
        if self._groups is None:
            keys: dict[tuple, list[str]] = {}
            for module in self.concatenated_modules():
                A = self[0].modules[module].A
                key = (self.ranks(module), self[0].modules[module].shape, A.dtype, A.device)
                keys.setdefault(key, []).append(module)
            self._groups = [tuple(group) for group in keys.values()]
        return self._groups

    def concatenated(self, module: str) -> ConcatenatedFactors:
        """The module's concatenated folded factors (views into its group's `stacked`)."""
        if module not in self._concatenated:
            group = next((group for group in self.groups() if module in group), None)
            if group is None:
                raise KeyError(f"module {module!r} is not trained by every update")
            stacked = self.stacked(group)
            for index, member in enumerate(group):
                self._concatenated[member] = stacked.of_module(index)
        return self._concatenated[module]

    def stacked(self, group: tuple[str, ...]) -> ConcatenatedFactors:
        """The concatenated folded factors of a group of `groups`, stacked: one concatenation
        and one scaling per factor for the whole group."""
        if group not in self._stacked:
            self._stacked[group] = self._concatenate(group)
        return self._stacked[group]

    def _concatenate(self, group: tuple[str, ...]) -> ConcatenatedFactors:
        factors = [update.modules[module] for module in group for update in self]
        U = torch.cat([f.B for f in factors], dim=1)
        V = torch.cat([f.A for f in factors], dim=0)
        client, position = self._index_tensors(self.ranks(group[0]), U.device)
        scales = torch.tensor([f.scale for f in factors], dtype=torch.float64)
        roots = scales.sqrt().to(U.dtype)
        roots = roots.view(len(group), len(self)).to(U.device, non_blocking=True)[:, client]
        d_out, d_in, width = U.shape[0], V.shape[1], client.shape[0]
        U = U.view(d_out, len(group), width).mul_(roots).permute(1, 0, 2)
        V = V.view(len(group), width, d_in).mul_(roots[:, :, None])
        return ConcatenatedFactors(U, V, client, position, len(self), roots)

    def client_index(self, module: str, device: torch.device) -> Tensor:
        """For every rank column of the module's concatenation, the client it belongs to."""
        return self._index_tensors(self.ranks(module), device)[0]

    def _index_tensors(self, ranks: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
        """Column j's client i (repeated r_i times) and position (j minus the first column of i)."""
        key = (ranks, device)
        if key not in self._indices:
            counts = torch.tensor(ranks, dtype=torch.long)
            client = torch.repeat_interleave(torch.arange(len(ranks)), counts)
            first = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
            position = torch.arange(client.shape[0]) - first
            self._indices[key] = (
                client.to(device, non_blocking=True),
                position.to(device, non_blocking=True),
            )
        return self._indices[key]


def validate_updates(
    updates: Sequence[ClientUpdate], kind: type, module_subsets: bool = False
) -> None:
    """Reject what cannot be aggregated, naming the client and the problem. With
    ``module_subsets`` (a rule that `allows_module_subsets`) clients may train different module
    sets, each non-empty; otherwise every client must train the same modules. Valid updates are
    recognised without a step per client and module in Python (`_plainly_valid`); otherwise the
    first problem is found update by update (`_refuse_invalid`)."""
    if not updates:
        raise InvalidUpdateError("no client updates to aggregate")
    batch = ClientUpdates.of(updates)
    if not _plainly_valid(batch, kind, module_subsets):
        _refuse_invalid(batch, kind, module_subsets)
    _check_finite(batch)


def _plainly_valid(updates: ClientUpdates, kind: type, module_subsets: bool) -> bool:
    """Whether `_refuse_invalid` passes the updates: per update, its example count, its module and
    head sets against the first update's, the kind of its module updates and its head shapes;
    then the outer shapes, of LoRA factors by concatenating each group of modules
    (`ClientUpdates.stacked`, which fails where two clients' shapes of a module differ), of other
    updates by comparing each update's with the first given for each module."""
    reference = updates[0]
    module_set, head_set = reference.modules.keys(), reference.head.keys()
    head_shapes = {name: tensor.shape for name, tensor in reference.head.items()}
    for update in updates:
        if not (isinstance(update.num_examples, int) and update.num_examples > 0):
            return False
        if module_subsets:
            if not update.modules:
                return False
        elif update.modules.keys() != module_set:
            return False
        if update.head.keys() != head_set:
            return False
        if not all(map(isinstance, update.modules.values(), repeat(kind))):
            return False
        if any(tensor.shape != head_shapes[name] for name, tensor in update.head.items()):
            return False
    if kind is LoRAFactors:
        return _concatenates(updates)
    return _same_outer_shapes(updates)


def _concatenates(updates: ClientUpdates) -> bool:
    """Whether every group of modules of every T_m concatenates (`ClientUpdates.stacked`)."""
    try:
        for trainers, _ in updates.by_trainers(updates.modules()):
            for group in trainers.groups():
                trainers.stacked(group)
    except RuntimeError:
        return False
    return True


def _same_outer_shapes(updates: Sequence[ClientUpdate]) -> bool:
    """Whether each update's outer shapes (`_outer_shape`) are the first given for each module."""
    shapes: dict[str, tuple[int, ...]] = {}
    for update in updates:
        own = dict(zip(update.modules, map(_outer_shape, update.modules.values())))
        shapes = {**own, **shapes}
        if not own.items() <= shapes.items():
            return False
    return True


def _refuse_invalid(updates: Sequence[ClientUpdate], kind: type, module_subsets: bool) -> None:
    """Raise on the first problem, update by update, naming the client and what is wrong."""
    reference = updates[0]
    module_set, head_set = set(reference.modules), set(reference.head)
    shapes: dict[str, tuple[int, ...]] = {}
    for update in updates:
        who = f"client {update.client_id!r}"
        if not isinstance(update.num_examples, int) or update.num_examples <= 0:
            raise InvalidUpdateError(
                f"{who}: example count must be a positive integer, got {update.num_examples!r}"
            )
        if module_subsets and not update.modules:
            raise InvalidUpdateError(f"{who}: trains no module")
        if not module_subsets and set(update.modules) != module_set:
            diff = sorted(set(update.modules) ^ module_set)
            raise InvalidUpdateError(
                f"{who}: module set differs from client {reference.client_id!r} on {diff}"
            )
        if set(update.head) != head_set:
            diff = sorted(set(update.head) ^ head_set)
            raise InvalidUpdateError(
                f"{who}: head parameters differ from client {reference.client_id!r} on {diff}"
            )
        for module, factors in update.modules.items():
            if not isinstance(factors, kind):
                raise InvalidUpdateError(
                    f"{who}: module {module!r} carries {type(factors).__name__}, this rule takes {kind.__name__}"
                )
        for module, factors in update.modules.items():
            _check_same_shape(shapes, module, _outer_shape(factors), who)
        for name, tensor in update.head.items():
            _check_same_shape(shapes, "head:" + name, tuple(tensor.shape), who)


def _check_finite(updates: Sequence[ClientUpdate]) -> None:
    """One flag per factor of each group of LoRA modules concatenated together (the concatenated
    factors the rules use anyway), per module of other updates and per head parameter, then one
    host synchronisation; on failure, name the client and the tensor."""
    batch = ClientUpdates.of(updates)
    flags = []
    for trainers, modules in batch.by_trainers(batch.modules()):
        if isinstance(trainers[0].modules[modules[0]], LoRAFactors):
            for group in trainers.groups():
                c = trainers.stacked(group)
                flags += [torch.isfinite(c.U).all(), torch.isfinite(c.V).all()]
            continue
        for module in modules:
            factors = trainers[0].modules[module]
            for attr in ("A", "B", "R"):
                if hasattr(factors, attr):
                    rows = torch.cat([getattr(u.modules[module], attr).flatten() for u in trainers])
                    flags.append(torch.isfinite(rows).all())
    for name in batch[0].head:
        flags.append(torch.isfinite(torch.stack([u.head[name] for u in batch])).all())
    if not flags or bool(torch.stack(flags).all()):
        return
    for update in updates:
        for name, tensor in update.tensors().items():
            if not torch.isfinite(tensor).all():
                raise InvalidUpdateError(
                    f"client {update.client_id!r}: non-finite values in {name!r}"
                )


def _outer_shape(factors: ModuleUpdate) -> tuple[int, ...]:
    if isinstance(factors, LoRAFactors):
        return factors.shape
    if hasattr(factors, "R"):
        return tuple(factors.R.shape)
    if hasattr(factors, "B"):
        return (factors.B.shape[0],)
    return (factors.A.shape[1],)


def _check_same_shape(shapes: dict, name: str, shape: tuple[int, ...], who: str) -> None:
    expected = shapes.setdefault(name, shape)
    if shape != expected:
        raise InvalidUpdateError(
            f"{who}: {name!r} has shape {shape}, other clients have {expected}"
        )


def example_weights(updates: Sequence[ClientUpdate], dtype: torch.dtype = torch.float64) -> Tensor:
    """p_i = n_i / sum_j n_j."""
    counts = torch.tensor([u.num_examples for u in updates], dtype=dtype)
    return counts / counts.sum()


def moved_like(tensor: Tensor, like: Tensor) -> Tensor:
    """``tensor`` in ``like``'s dtype on its device; a copy from the host is queued without
    waiting for the device (a blocking copy would wait for all the work queued before it)."""
    return tensor.to(device=like.device, dtype=like.dtype, non_blocking=True)


def weighted_sum(tensors: Sequence[Tensor], weights: Tensor) -> Tensor:
    """sum_i w_i T_i in one stacked reduction."""
    stacked = torch.stack(list(tensors))
    w = moved_like(weights, stacked)
    return torch.tensordot(w, stacked, dims=1)


def average_head(updates: Sequence[ClientUpdate], weights: Tensor) -> dict[str, Tensor]:
    """The example-weighted average of every full (head) parameter: exact, since it is linear."""
    return {
        name: weighted_sum([u.head[name] for u in updates], weights) for name in updates[0].head
    }


def check_module_subsets(expected: Mapping[str, object], updates: Sequence[ClientUpdate]) -> None:
    """Every update trains a non-empty subset of the global modules."""
    for update in updates:
        unknown = sorted(set(update.modules) - set(expected))
        if unknown:
            raise InvalidUpdateError(
                f"client {update.client_id!r}: trains modules {unknown} that the global state "
                f"does not adapt"
            )


def check_same_modules(expected: Mapping[str, object], updates: Sequence[ClientUpdate]) -> None:
    got = set(updates[0].modules)
    if got != set(expected):
        raise InvalidUpdateError(
            f"updates adapt modules {sorted(got ^ set(expected))} that the global state does not (or vice versa)"
        )
