"""Aggregation benchmark: every rule on a Llama-shaped adapter, next to a naive dense loop.

For each client count the benchmark draws one update per client and module on the target device
(seeded; B small as after a few steps, A as peft initialises it; uneven example counts). Each rule
starts from ``init_state`` on a common initial adapter and runs round 1 untimed (the warm-up); round
2, from the state round 1 left, is the one measured, so that the payload is the one a client that
took part in the previous round receives (for Fed-SB: R without the one-time fixed factors):

- ``seconds``: the rule's own ``aggregate`` (its output), the median of ``repeats`` runs;
- ``relative_error``: ``RoundResult.relative_deviation`` (a dense GEMM per module, float32), timed
  apart as ``error_seconds``, not part of ``seconds``;
- ``bytes_up_per_client``: the update tensors a client of the largest rank sends, as serialized;
  ``bytes_down_per_client``: the rule's payload to that client (``ClientSpec.version`` = 1);
- ``naive_seconds``: a Python loop over clients adding dense p_i s_i B_i A_i per module, as the
  reference codes do (rules whose updates are LoRA factors only);
- ``gemm_seconds``: one stacked GEMM per module, [B_1 ... B_K] @ [p_1 s_1 A_1; ...; p_K s_K A_K],
  alone in float32 (``gemm_bf16_seconds``: in bfloat16, on CUDA only).

A sample of the modules may be built and timed (the default on the CPU): all modules have one shape,
so times and bytes are scaled by modules_total / modules_timed (``scaled`` says so), and
relative_error is the worst over the sampled modules.
"""

from __future__ import annotations

import inspect
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from fedlora.errors import ConfigError
from fedlora.lora.adapter import (
    Adapter,
    LoRAFactors,
    ModuleUpdate,
    SBCore,
    SharedA,
    TrainedB,
    lora_scale,
)
from fedlora.lora.lowrank import LowRank
from fedlora.lora.updates import ClientUpdate, example_weights
from fedlora.rules import RULES, AggregationRule, ClientSpec, make_rule
from fedlora.rules.flora import stack_adapters
from fedlora.wire.messages import to_wire

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
CPU_SAMPLED_MODULES = 2
"""Modules timed on the CPU unless told otherwise (all of them on CUDA and in quick mode)."""
B_STD = 1e-3
"""Standard deviation of the entries of B, small as after a few local steps."""
ALPHA_PER_RANK = 2
"""LoRA alpha as a multiple of the top rank (alpha = 2 r, a common choice)."""
SB_CORE_STEP = 1e-2
"""Relative size of a Fed-SB client's change of R."""
MIN_EXAMPLES, MAX_EXAMPLES = 50, 1000


def check_device(device: str) -> None:
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use cpu or cuda") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA device")
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r}: the benchmark runs on cpu or cuda")


@dataclass(frozen=True)
class BenchConfig:
    """A ``layers`` x (q, k, v, o) adapter of ``hidden`` x ``hidden`` modules at top rank ``rank``.

    ``client_ranks`` are cycled over the clients (empty: every client at ``rank``); ``methods`` empty
    means every implemented rule; ``sample_modules`` None means every module.
    """

    layers: int = 32
    hidden: int = 4096
    rank: int = 16
    client_ranks: tuple[int, ...] = ()
    clients: tuple[int, ...] = (10, 100)
    methods: tuple[str, ...] = ()
    device: str = "cpu"
    sample_modules: int | None = None
    repeats: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        positive = ("layers", "hidden", "rank", "repeats")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.clients or min(self.clients) < 1:
            raise ConfigError(f"client counts must be positive, got {self.clients}")
        if self.client_ranks and not all(0 < r <= self.rank for r in self.client_ranks):
            raise ConfigError(f"client ranks {self.client_ranks} must lie in 1..{self.rank}")
        if self.sample_modules is not None and self.sample_modules < 1:
            raise ConfigError(f"sample_modules must be positive, got {self.sample_modules}")
        check_device(self.device)

    @property
    def modules_total(self) -> int:
        return self.layers * len(PROJECTIONS)

    @property
    def modules_timed(self) -> int:
        return min(self.sample_modules or self.modules_total, self.modules_total)

    def ranks_of(self, clients: int) -> list[int]:
        ranks = self.client_ranks or (self.rank,)
        return [ranks[i % len(ranks)] for i in range(clients)]


FULL = BenchConfig()
QUICK = BenchConfig(layers=4, hidden=256, rank=8, clients=(4, 10), repeats=3)


def preset(quick: bool, device: str) -> BenchConfig:
    """The Llama-7B-shaped benchmark (a module sample on the CPU), or the seconds-long quick one."""
    if quick:
        return replace(QUICK, device=device)
    sample = CPU_SAMPLED_MODULES if device == "cpu" else None
    return replace(FULL, device=device, sample_modules=sample)


def implemented_methods() -> list[str]:
    """Registered rules that can be built (a rule still being written is an abstract placeholder)."""
    return [name for name, rule in RULES.items() if not inspect.isabstract(rule)]


def describe_device(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


# ---- inputs ---------------------------------------------------------------------------------------


@dataclass
class Workload:
    """One round's clients (ranks, scales, example counts) and their common initial adapter."""

    modules: list[str]
    shape: tuple[int, int]
    ranks: list[int]
    scales: list[float]
    counts: list[int]
    initial: Adapter
    generator: torch.Generator

    @property
    def device(self) -> torch.device:
        return self.generator.device

    def kaiming_A(self, rank: int) -> Tensor:
        """A as peft initialises it: uniform in +-1/sqrt(d_in)."""
        d_in = self.shape[1]
        uniform = torch.rand(rank, d_in, generator=self.generator, device=self.device)
        return (uniform * 2 - 1) / d_in**0.5

    def small_B(self, rank: int) -> Tensor:
        d_out = self.shape[0]
        return torch.randn(d_out, rank, generator=self.generator, device=self.device) * B_STD

    def spec(self, client: int, version: int) -> ClientSpec:
        return ClientSpec(
            ranks=dict.fromkeys(self.modules, self.ranks[client]),
            scales=dict.fromkeys(self.modules, self.scales[client]),
            version=version,
            client=str(client),
        )


def module_names(layers: int) -> list[str]:
    return [f"model.layers.{i}.self_attn.{p}" for i in range(layers) for p in PROJECTIONS]


def build_workload(config: BenchConfig, clients: int) -> Workload:
    """Seeded clients and initial adapter on the config's device, for the sampled modules only."""
    seed = config.seed * 1_000_003 + clients
    generator = torch.Generator(device=config.device).manual_seed(seed)
    alpha = ALPHA_PER_RANK * config.rank
    ranks = config.ranks_of(clients)
    counts = torch.randint(
        MIN_EXAMPLES, MAX_EXAMPLES, (clients,), generator=torch.Generator().manual_seed(seed)
    )
    workload = Workload(
        modules=module_names(config.layers)[: config.modules_timed],
        shape=(config.hidden, config.hidden),
        ranks=ranks,
        scales=[lora_scale(alpha, r) for r in ranks],
        counts=counts.tolist(),
        initial={},
        generator=generator,
    )
    scale = lora_scale(alpha, config.rank)
    for module in workload.modules:
        A, B = workload.kaiming_A(config.rank), workload.small_B(config.rank)
        workload.initial[module] = LoRAFactors(A=A, B=B, scale=scale)
    return workload


def lora_update(workload: Workload, client: int) -> LoRAFactors:
    rank = workload.ranks[client]
    return LoRAFactors(
        A=workload.kaiming_A(rank), B=workload.small_B(rank), scale=workload.scales[client]
    )


def shared_a_update(workload: Workload, client: int) -> SharedA:
    return SharedA(A=workload.kaiming_A(workload.ranks[client]), scale=workload.scales[client])


def trained_b_update(workload: Workload, client: int) -> TrainedB:
    rank = workload.ranks[client]
    return TrainedB(B=workload.small_B(rank), scale=workload.scales[client])


def sb_core_update(workload: Workload, client: int) -> SBCore:
    """R_0 = s I (`FedSB.init_state` of the initial adapter) moved on its leading r_i x r_i block."""
    initial = next(iter(workload.initial.values()))
    rank = workload.ranks[client]
    R = initial.scale * torch.eye(initial.rank, device=workload.device)
    noise = torch.randn(rank, rank, generator=workload.generator, device=workload.device)
    R[:rank, :rank] += noise * initial.scale * SB_CORE_STEP
    return SBCore(R=R, rank=rank)


@dataclass(frozen=True)
class UpdateKind:
    """How the benchmark builds one kind of client update, and whether a dense baseline applies."""

    make_update: Callable[[Workload, int], ModuleUpdate]
    dense_baseline: bool


UPDATE_KINDS: dict[type, UpdateKind] = {
    LoRAFactors: UpdateKind(lora_update, dense_baseline=True),
    SharedA: UpdateKind(shared_a_update, dense_baseline=False),
    SBCore: UpdateKind(sb_core_update, dense_baseline=False),
    TrainedB: UpdateKind(trained_b_update, dense_baseline=False),
}
"""Each rule's inputs by its ``update_kind``: LoRA factors, FedSA's A alone, Fed-SB's R,
FFA-LoRA's B alone."""


def client_updates(workload: Workload, kind: UpdateKind) -> list[ClientUpdate]:
    return [
        ClientUpdate(
            client_id=str(client),
            num_examples=count,
            modules={module: kind.make_update(workload, client) for module in workload.modules},
        )
        for client, count in enumerate(workload.counts)
    ]


# ---- timing ---------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def timed(fn: Callable[[], object], device: str, repeats: int = 1, warmup: bool = True):
    """(median seconds over ``repeats`` calls after an untimed warm-up call, the last result).

    Each call's result is dropped before the next call starts, so that only one is held at a time.
    """
    seconds, result = [], None
    for run in range(repeats + int(warmup)):
        result = None
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        if run >= int(warmup):
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def naive_dense_sum(updates: Sequence[ClientUpdate], weights: list[float], modules: list[str]):
    """The reference codes' way: per module, a Python loop over clients adding p_i s_i B_i A_i."""
    for module in modules:
        first = updates[0].modules[module]
        total = first.B.new_zeros(first.shape)
        for update, p in zip(updates, weights):
            factors = update.modules[module]
            total += (p * factors.scale) * (factors.B @ factors.A)


def dense_products(stacks: Sequence[LowRank]) -> None:
    """One GEMM per module; the dense results are dropped."""
    for stacked in stacks:
        stacked.dense()


@dataclass(frozen=True)
class Baselines:
    naive_seconds: float
    gemm_seconds: float
    gemm_bf16_seconds: float | None


def measure_baselines(updates: list[ClientUpdate], config: BenchConfig) -> Baselines:
    weights = example_weights(updates)
    modules = list(updates[0].modules)
    naive, _ = timed(
        lambda: naive_dense_sum(updates, weights.tolist(), modules), config.device, config.repeats
    )
    stacks = [stack_adapters(updates, weights, module) for module in modules]
    gemm, _ = timed(lambda: dense_products(stacks), config.device, config.repeats)
    gemm_bf16 = None
    if config.device.startswith("cuda"):
        stacks = [stacked.to(torch.bfloat16) for stacked in stacks]
        gemm_bf16, _ = timed(lambda: dense_products(stacks), config.device, config.repeats)
    return Baselines(naive, gemm, gemm_bf16)


# ---- one rule -------------------------------------------------------------------------------------


def wire_bytes(tensors: dict[str, Tensor]) -> int:
    """Bytes of tensor data as serialized (half types travel widened, see `to_wire`)."""
    return sum(t.numel() * to_wire(t).element_size() for t in tensors.values())


def scaled(seconds: float | None, scale: float) -> float | None:
    return None if seconds is None else seconds * scale


def measure_rule(
    rule: AggregationRule,
    workload: Workload,
    updates: list[ClientUpdate],
    baselines: Baselines | None,
    config: BenchConfig,
) -> dict:
    """One result row: round 2's seconds, error and bytes, scaled from the sampled modules."""
    previous = rule.aggregate(rule.init_state(workload.initial), updates).state
    seconds, result = timed(
        lambda: rule.aggregate(previous, updates), config.device, config.repeats, warmup=False
    )
    error_seconds, relative_error = timed(result.relative_deviation, config.device, warmup=False)
    largest = max(range(len(updates)), key=workload.ranks.__getitem__)
    payload = rule.client_payload(result.state, workload.spec(largest, previous.version))
    scale = config.modules_total / config.modules_timed
    seconds *= scale
    naive = scaled(baselines and baselines.naive_seconds, scale)
    return {
        "method": rule.name,
        "clients": len(updates),
        "seconds": seconds,
        "naive_seconds": naive,
        "relative_error": relative_error,
        "bytes_up_per_client": round(wire_bytes(updates[largest].tensors()) * scale),
        "bytes_down_per_client": round(payload.tensor_bytes() * scale),
        "device": config.device,
        "exact": rule.exact,
        "speedup_vs_naive": naive / seconds if naive else None,
        "gemm_seconds": scaled(baselines and baselines.gemm_seconds, scale),
        "gemm_bf16_seconds": scaled(baselines and baselines.gemm_bf16_seconds, scale),
        "error_seconds": scaled(error_seconds if relative_error is not None else None, scale),
        "modules_timed": config.modules_timed,
        "modules_total": config.modules_total,
        "scaled": config.modules_timed < config.modules_total,
        "repeats": config.repeats,
    }


# ---- the benchmark --------------------------------------------------------------------------------


def selected_rules(config: BenchConfig) -> list[AggregationRule]:
    available = implemented_methods()
    names = config.methods or tuple(available)
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ConfigError(f"no rule {unknown} to benchmark; implemented rules: {available}")
    return [make_rule(name) for name in names]


def iter_aggregate_benchmark(config: BenchConfig) -> Iterator[dict]:
    """Yield one result row per (client count, rule) as it is measured."""
    rules = selected_rules(config)
    for clients in config.clients:
        workload = build_workload(config, clients)
        for update_kind in dict.fromkeys(rule.update_kind for rule in rules):
            kind = UPDATE_KINDS[update_kind]
            updates = client_updates(workload, kind)
            baselines = measure_baselines(updates, config) if kind.dense_baseline else None
            for rule in rules:
                if rule.update_kind is update_kind:
                    yield measure_rule(rule, workload, updates, baselines, config)
            del updates


def run_aggregate_benchmark(config: BenchConfig) -> list[dict]:
    """Every result row (see the module docstring for the keys)."""
    return list(iter_aggregate_benchmark(config))
