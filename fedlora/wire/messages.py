"""The wire format shared by server and clients: record names, tensor keys and config keys, and
how every payload and update travels.

Tensors are keyed as in peft's adapter state dict, by the adapted module's path:
``{module}.lora_A.weight`` (r x d_in) and ``{module}.lora_B.weight`` (d_out x r). Fed-SB sends
``{module}.sb_R.weight`` (r x r) and, once, its fixed ``{module}.sb_A.weight``/``{module}.sb_B.weight``.
A change of the base weights travels as ``{module}.U``/``{module}.V`` (factors) or ``{module}.dense``.
Per-module ranks and scales travel in the config as ``rank.{module}`` and ``scale.{module}``
(`ranks_in` reads them). A client's update travels in the format of its kind (`UPDATE_FORMATS`):
LoRA factors, FedSA-LoRA's A alone, FFA-LoRA's B alone, or Fed-SB's R with its capacity as the
rank.
Tensors travel in the dtype the math ran in (float32, or float64), never in a half type: bfloat16
cannot be held by Flower's ArrayRecord, and half precision would break the exact methods.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedlora.errors import InvalidUpdateError
from fedlora.lora.adapter import Adapter, LoRAFactors, ModuleUpdate, SBCore, SharedA, TrainedB
from fedlora.lora.lowrank import LowRank
from fedlora.wire.npy import moved_together

ADAPTER_RECORD = "adapter"
HEAD_RECORD = "head"
BASE_CHANGE_RECORD = "base_change"
CONFIG_RECORD = "config"

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
B_TAIL_SUFFIX = ".lora_B.tail"
"""FFA-LoRA: the global B's columns past a client's rank, which it folds into its base."""
SB_R_SUFFIX = ".sb_R.weight"
SB_A_SUFFIX = ".sb_A.weight"
SB_B_SUFFIX = ".sb_B.weight"

VERSION_KEY = "version"
FROM_VERSION_KEY = "base-from-version"
"""In a payload of a method that changes the base: the version whose base the payload's changes
start from (the one the node restated)."""
NUM_EXAMPLES_KEY = "num-examples"
FRESH_ADAPTER_SEED_KEY = "fresh-adapter-seed"
FROZEN_A_SEED_KEY = "frozen-a-seed"
"""FFA-LoRA: the seed every client draws its frozen A from."""

# Flower messages: the reply's metrics record, what a node restates in every reply, the round, and
# where per-round base changes lie when they do not travel in messages (``base-store``).
METRICS_RECORD = "metrics"
PARTITION_ID_KEY = "partition-id"
ROUND_KEY = "server-round"
HELD_ROUND_KEY = "held-round"
"""In a rank query: the newest round whose state the node should hold (the round before a
training exchange, the round itself before an evaluation), for a node that resumes from its
store."""
BASE_STORE_KEY = "base-store"
LOSS_KEY = "loss"
ACCURACY_KEY = "accuracy"
GENERATION_KEY = "generation"
"""An evaluate reply's generation score on the client's held-out split (``client-generation``)."""
SECONDS_KEY = "seconds"
TRAIN_STARTED_KEY = "train-started-at"
"""Wall-clock time (seconds since the epoch) when a client's local training started: the group's
start for clients trained together. With ``seconds`` it places the training on the server's
clock where both share one (a simulation)."""
HANDLER_SECONDS_KEY = "handler-seconds"
"""Seconds a client spent on a train message, from receiving it to its reply (training included)."""

# Fed-SB's federated initialisation: a ``query.sb_init`` message asks for gradient estimates;
# a reply carries ``{module}.sketch_Y``/``{module}.sketch_Z`` (sketch mode) or ``{module}.gradient``.
SB_INIT_ACTION = "sb_init"
SB_INIT_MODE_KEY = "sb-init-mode"
SB_INIT_RANK_KEY = "sb-init-rank"
SB_INIT_SEED_KEY = "sb-init-seed"
SKETCH_Y_SUFFIX = ".sketch_Y"
SKETCH_Z_SUFFIX = ".sketch_Z"
GRADIENT_SUFFIX = ".gradient"


def rank_key(module: str) -> str:
    return f"rank.{module}"


def rank_modules(config: Mapping[str, Scalar]) -> list[str]:
    """The modules a config states a rank for (its ``rank.{module}`` keys), sorted."""
    prefix = rank_key("")
    return sorted(key.removeprefix(prefix) for key in config if key.startswith(prefix))


def ranks_in(config: Mapping[str, Scalar]) -> dict[str, int]:
    """The ``rank.{module}`` entries of a config."""
    return {module: int(config[rank_key(module)]) for module in rank_modules(config)}


def scale_key(module: str) -> str:
    return f"scale.{module}"


def start_rank_key(module: str) -> str:
    """The rank a client received, restated in its reply where it pruned it (HetLoRA)."""
    return f"start-rank.{module}"


Scalar = int | float | str | bool


@dataclass
class Payload:
    """What crosses the wire one way: named tensor records and a flat config."""

    adapter: dict[str, Tensor] = field(default_factory=dict)
    head: dict[str, Tensor] = field(default_factory=dict)
    base_change: dict[str, Tensor] = field(default_factory=dict)
    config: dict[str, Scalar] = field(default_factory=dict)

    def to(self, device: torch.device) -> Payload:
        """The payload with its tensors on ``device`` (the client's math then runs there), each
        record's tensors moved together (`fedlora.wire.npy.moved_together`)."""
        return Payload(
            moved_together(self.adapter, device),
            moved_together(self.head, device),
            moved_together(self.base_change, device),
            dict(self.config),
        )

    def tensor_bytes(self) -> int:
        """Bytes of tensor data, as serialized (element count times element size)."""
        records = (self.adapter, self.head, self.base_change)
        return sum(t.numel() * t.element_size() for record in records for t in record.values())


def to_wire(tensor: Tensor) -> Tensor:
    """A tensor as it travels: half types widened to float32, float32/float64 kept."""
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.float()
    return tensor


def adapter_to_tensors(adapter: Adapter) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    for module, factors in adapter.items():
        tensors[module + A_SUFFIX] = to_wire(factors.A)
        tensors[module + B_SUFFIX] = to_wire(factors.B)
    return tensors


def adapter_config(adapter: Mapping[str, LoRAFactors | SharedA | TrainedB]) -> dict[str, Scalar]:
    """``rank.{module}`` and ``scale.{module}`` of each module's factors."""
    config: dict[str, Scalar] = {}
    for module, factors in adapter.items():
        config[rank_key(module)] = factors.rank
        config[scale_key(module)] = float(factors.scale)
    return config


def modules_with_suffix(tensors: Mapping[str, Tensor], suffix: str) -> list[str]:
    return sorted(key[: -len(suffix)] for key in tensors if key.endswith(suffix))


def adapter_from_tensors(
    tensors: Mapping[str, Tensor], config: Mapping[str, Scalar], dtype: torch.dtype | None = None
) -> Adapter:
    """Rebuild an adapter, checking that every module has A and B and that the declared rank matches."""
    modules_a = modules_with_suffix(tensors, A_SUFFIX)
    modules_b = modules_with_suffix(tensors, B_SUFFIX)
    if modules_a != modules_b:
        missing = sorted(set(modules_a) ^ set(modules_b))
        raise InvalidUpdateError(f"modules without both lora_A and lora_B: {missing}")
    adapter: Adapter = {}
    for module in modules_a:
        A, B = tensors[module + A_SUFFIX], tensors[module + B_SUFFIX]
        if dtype is not None:
            A, B = A.to(dtype), B.to(dtype)
        declared = config.get(rank_key(module))
        if declared is None or scale_key(module) not in config:
            raise InvalidUpdateError(f"module {module!r}: rank or scale missing from the config")
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != declared or B.shape[1] != declared:
            raise InvalidUpdateError(
                f"module {module!r}: declared rank {declared} does not match lora_A "
                f"{tuple(A.shape)} and lora_B {tuple(B.shape)}"
            )
        adapter[module] = LoRAFactors(A=A, B=B, scale=float(config[scale_key(module)]))
    return adapter


def change_to_tensors(change: Mapping[str, LowRank | Tensor]) -> dict[str, Tensor]:
    """Base changes per module: factors when smaller than the dense matrix, else dense."""
    tensors: dict[str, Tensor] = {}
    for module, delta in change.items():
        if isinstance(delta, LowRank) and not delta.dense_is_smaller():
            tensors[module + ".U"] = to_wire(delta.U)
            tensors[module + ".V"] = to_wire(delta.V)
        else:
            dense = delta.dense() if isinstance(delta, LowRank) else delta
            tensors[module + ".dense"] = to_wire(dense)
    return tensors


def change_from_tensors(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Dense base changes per module from `change_to_tensors`' layout."""
    change: dict[str, Tensor] = {}
    for module in modules_with_suffix(tensors, ".dense"):
        change[module] = tensors[module + ".dense"]
    for module in modules_with_suffix(tensors, ".U"):
        change[module] = tensors[module + ".U"] @ tensors[module + ".V"]
    return change


# ---- client updates, by kind ---------------------------------------------------------------------


def lora_to_tensors(adapter: Adapter) -> tuple[dict[str, Tensor], dict[str, Scalar]]:
    """A LoRA update: ``lora_A`` and ``lora_B`` per module, its ranks and scales."""
    return adapter_to_tensors(adapter), adapter_config(adapter)


def shared_a_to_tensors(
    shared: Mapping[str, SharedA],
) -> tuple[dict[str, Tensor], dict[str, Scalar]]:
    """FedSA-LoRA's upload: ``{module}.lora_A.weight`` alone, its ranks and scales."""
    tensors = {module + A_SUFFIX: to_wire(update.A) for module, update in shared.items()}
    return tensors, adapter_config(shared)


def trained_b_to_tensors(
    trained: Mapping[str, TrainedB],
) -> tuple[dict[str, Tensor], dict[str, Scalar]]:
    """FFA-LoRA's upload: ``{module}.lora_B.weight`` alone, its ranks and scales."""
    tensors = {module + B_SUFFIX: to_wire(update.B) for module, update in trained.items()}
    return tensors, adapter_config(trained)


def one_factor_from_tensors(
    tensors: Mapping[str, Tensor], config: Mapping[str, Scalar], suffix: str, rank_axis: int
) -> dict[str, tuple[Tensor, float]]:
    """An upload of one factor per module with its declared rank and scale (FedSA-LoRA's
    ``lora_A``, rank on axis 0; FFA-LoRA's ``lora_B``, axis 1), refusing a rank that does not
    match."""
    modules = {}
    for module in modules_with_suffix(tensors, suffix):
        factor = tensors[module + suffix]
        if rank_key(module) not in config or scale_key(module) not in config:
            raise InvalidUpdateError(f"module {module!r}: rank or scale missing from the config")
        if factor.ndim != 2 or factor.shape[rank_axis] != int(config[rank_key(module)]):
            raise InvalidUpdateError(
                f"module {module!r}: declared rank {config[rank_key(module)]} does not match "
                f"{suffix.strip('.').removesuffix('.weight')} {tuple(factor.shape)}"
            )
        modules[module] = factor, float(config[scale_key(module)])
    return modules


def shared_a_from_tensors(
    tensors: Mapping[str, Tensor], config: Mapping[str, Scalar]
) -> dict[str, SharedA]:
    """FedSA-LoRA's upload as `SharedA` per module."""
    uploads = one_factor_from_tensors(tensors, config, A_SUFFIX, 0)
    return {module: SharedA(A=A, scale=scale) for module, (A, scale) in uploads.items()}


def trained_b_from_tensors(
    tensors: Mapping[str, Tensor], config: Mapping[str, Scalar]
) -> dict[str, TrainedB]:
    """FFA-LoRA's upload as `TrainedB` per module."""
    uploads = one_factor_from_tensors(tensors, config, B_SUFFIX, 1)
    return {module: TrainedB(B=B, scale=scale) for module, (B, scale) in uploads.items()}


def checked_capacity(module: str, capacity: Scalar | None, rank: int) -> int:
    """A Fed-SB capacity as declared: an integer in 1..rank."""
    if capacity is None:
        raise InvalidUpdateError(f"module {module!r}: no Fed-SB capacity given")
    if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= rank:
        raise InvalidUpdateError(
            f"module {module!r}: Fed-SB capacity {capacity!r} outside 1..{rank}"
        )
    return capacity


def cores_to_tensors(cores: Mapping[str, SBCore]) -> tuple[dict[str, Tensor], dict[str, Scalar]]:
    """Fed-SB's update: ``{module}.sb_R.weight`` (full R) and its capacity as ``rank.{module}``."""
    tensors = {module + SB_R_SUFFIX: to_wire(core.R) for module, core in cores.items()}
    config: dict[str, Scalar] = {rank_key(module): core.rank for module, core in cores.items()}
    return tensors, config


def cores_from_tensors(
    tensors: Mapping[str, Tensor], config: Mapping[str, Scalar]
) -> dict[str, SBCore]:
    """Fed-SB's update, refusing a non-square R and a missing or out-of-range capacity."""
    cores = {}
    for module in modules_with_suffix(tensors, SB_R_SUFFIX):
        R = tensors[module + SB_R_SUFFIX]
        if R.ndim != 2 or R.shape[0] != R.shape[1]:
            raise InvalidUpdateError(
                f"module {module!r}: Fed-SB's R must be square, got {tuple(R.shape)}"
            )
        cores[module] = SBCore(
            R=R, rank=checked_capacity(module, config.get(rank_key(module)), R.shape[0])
        )
    return cores


@dataclass(frozen=True)
class UpdateFormat:
    """How one kind of client update travels: its tensors and config, and back from them."""

    to_tensors: Callable[[Mapping[str, ModuleUpdate]], tuple[dict[str, Tensor], dict[str, Scalar]]]
    from_tensors: Callable[[Mapping[str, Tensor], Mapping[str, Scalar]], dict[str, ModuleUpdate]]


UPDATE_FORMATS: dict[type, UpdateFormat] = {
    LoRAFactors: UpdateFormat(lora_to_tensors, adapter_from_tensors),
    SharedA: UpdateFormat(shared_a_to_tensors, shared_a_from_tensors),
    SBCore: UpdateFormat(cores_to_tensors, cores_from_tensors),
    TrainedB: UpdateFormat(trained_b_to_tensors, trained_b_from_tensors),
}
"""The wire format of each kind of update a rule declares (`AggregationRule.update_kind`)."""


def update_format(kind: type) -> UpdateFormat:
    """The wire format of updates of this kind."""
    if kind not in UPDATE_FORMATS:
        raise TypeError(f"no wire format for updates of kind {kind.__name__}")
    return UPDATE_FORMATS[kind]
