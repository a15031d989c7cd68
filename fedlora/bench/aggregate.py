"""Aggregation benchmark: every rule on a Llama-shaped adapter, next to a naive dense loop.

For each client count the benchmark draws one update per client and module on the target device
(seeded; B small as after a few steps, A as peft initialises it; uneven example counts). Each rule
starts from ``init_state`` on a common initial adapter and runs round 1 untimed (the warm-up); round
2, from the state round 1 left, is the one measured, so that the payload is the one a client that
took part in the previous round receives (for Fed-SB: R without the one-time fixed factors):

- ``seconds``: the rule's own ``aggregate`` (its output), the median of ``repeats`` runs;
- ``relative_error``: ``RoundResult.relative_deviation`` (a dense GEMM per module, float32), timed
  apart as ``error_seconds``, not part of ``seconds``;
- ``bytes_up_per_client``: the update tensors sent by the client with the largest update, as
  serialized; ``bytes_down_per_client``: the rule's payload to that client (``ClientSpec.version`` =
  1, the client's own rank per module);
- ``naive_seconds``: a Python loop over clients adding dense p_i s_i B_i A_i per module, as the
  reference codes do (rules whose updates are LoRA factors only);
- ``gemm_seconds``: one stacked GEMM per module, [B_1 ... B_K] @ [p_1 s_1 A_1; ...; p_K s_K A_K],
  alone in float32 (``gemm_bf16_seconds``: in bfloat16, on CUDA only).

FlexLoRA takes one row per SVD path asked for (``flexlora_svd``; none: its default alone), named
by the path, and for "auto" by the path it took: ``flexlora (auto: randomized)``, ``flexlora
(exact)``, ``flexlora (randomized)`` (``name`` in each row; ``method`` is the rule's).

What the clients train comes from the rule's ``client_ranks`` for each client's capacity class. A rule
that takes one rank per node trains every module at its class, the config's ``client_ranks`` cycled
over the clients (none given: every client at the top rank r). A rule that configures a node's
modules from its class (``client_ranks`` gives a dict: LEGEND's depth and per-layer ranks) gets its
own workload: each client's update holds only the modules its class adapts, at their ranks, the
classes being ``client_ranks`` cycled or, none given, ceil(r/4), ceil(r/2), r cycled, so that the
depth varies (``client_classes`` in each row). The dense baselines then sum each module over the
clients that trained it, with the weights p_i / sum_{j in T_m} p_j, the update the rule approximates.

A sample of the modules may be built and timed (the default on the CPU): all modules have one shape,
so times and bytes are scaled by modules_total / modules_timed (``scaled`` says so), and
relative_error is the worst over the sampled modules. Where every client trains every module, the
sample is the first modules (``module_sample``: "first"); where a rule configures the modules, the
modules near the output are trained by more clients than those far from it, so the sample is spread
evenly over the depth and ends at the top module ("spread"), and its scaled times and bytes are
estimates ("all": no sample).
"""

from __future__ import annotations

import inspect
import math
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
from fedlora.lora.updates import ClientUpdate, ClientUpdates, example_weights
from fedlora.rules import RULES, AggregationRule, ClientSpec, make_rule
from fedlora.rules.flexlora import SVD_PATHS, FlexLoRA
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
    means every implemented rule; ``sample_modules`` None means every module; ``flexlora_svd``
    empty means FlexLoRA's default SVD path alone.
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
    flexlora_svd: tuple[str, ...] = ()

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
        unknown = [path for path in self.flexlora_svd if path not in SVD_PATHS]
        if unknown:
            raise ConfigError(f"FlexLoRA SVD paths {unknown}: choose from {list(SVD_PATHS)}")
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

    def capacities_of(self, clients: int) -> list[int]:
        """Capacity classes for a rule that configures modules from them: ``client_ranks`` cycled,
        or none given, ceil(r/4), ceil(r/2), r cycled."""
        spread = tuple(dict.fromkeys(math.ceil(self.rank / d) for d in (4, 2, 1)))
        classes = self.client_ranks or spread
        return [classes[i % len(classes)] for i in range(clients)]


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
    """One round's clients (the rank and scale of each module a client trains, example counts) and
    their common initial adapter of the built modules."""

    modules: list[str]
    shape: tuple[int, int]
    ranks: list[dict[str, int]]
    scales: list[dict[str, float]]
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

    def largest_client(self) -> int:
        """The client with the largest update (the most rank summed over its modules; the first)."""
        return max(range(len(self.ranks)), key=lambda client: sum(self.ranks[client].values()))

    def spec(self, client: int, version: int) -> ClientSpec:
        return ClientSpec(
            ranks=dict(self.ranks[client]),
            scales=dict(self.scales[client]),
            version=version,
            client=str(client),
        )


def module_names(layers: int) -> list[str]:
    return [f"model.layers.{i}.self_attn.{p}" for i in range(layers) for p in PROJECTIONS]


def spread_sample(modules: Sequence[str], count: int) -> list[str]:
    """``count`` modules spread evenly over ``modules`` (ordered from the input to the output): the
    last of each of ``count`` equal stretches, so the top module is always one."""
    total = len(modules)
    return [modules[math.ceil((i + 1) * total / count) - 1] for i in range(count)]


@dataclass
class ClientPlan:
    """What a rule's clients train: their capacity classes, the modules built and timed, how they
    were sampled, and each client's rank per module among them."""

    classes: list[int]
    modules: list[str]
    sample: str
    ranks: list[dict[str, int]]


def configures_modules(rule: AggregationRule, modules: Sequence[str], top_rank: int) -> bool:
    """Whether the rule sets a node's modules and ranks from its capacity class (``client_ranks``
    gives a dict, as LEGEND's does) rather than taking the class as every module's rank."""
    return not isinstance(rule.client_ranks(top_rank, modules, top_rank), int)


def client_plan(rule: AggregationRule, config: BenchConfig, clients: int) -> ClientPlan:
    """The clients of ``rule`` as the module docstring states them."""
    every = module_names(config.layers)
    sampled = config.modules_timed < config.modules_total
    if not configures_modules(rule, every, config.rank):
        classes = config.ranks_of(clients)
        modules = every[: config.modules_timed]
        ranks = [dict.fromkeys(modules, rank) for rank in classes]
        return ClientPlan(classes, modules, "first" if sampled else "all", ranks)
    classes = config.capacities_of(clients)
    modules = spread_sample(every, config.modules_timed)
    ranks = []
    for capacity in classes:
        configured = rule.client_ranks(capacity, every, config.rank)
        ranks.append({module: configured[module] for module in modules if module in configured})
    return ClientPlan(classes, modules, "spread" if sampled else "all", ranks)


def build_workload(config: BenchConfig, clients: int, plan: ClientPlan) -> Workload:
    """Seeded clients and initial adapter on the config's device, for the plan's modules only."""
    seed = config.seed * 1_000_003 + clients
    generator = torch.Generator(device=config.device).manual_seed(seed)
    alpha = ALPHA_PER_RANK * config.rank
    counts = torch.randint(
        MIN_EXAMPLES, MAX_EXAMPLES, (clients,), generator=torch.Generator().manual_seed(seed)
    )
    workload = Workload(
        modules=plan.modules,
        shape=(config.hidden, config.hidden),
        ranks=plan.ranks,
        scales=[{m: lora_scale(alpha, r) for m, r in ranks.items()} for ranks in plan.ranks],
        counts=counts.tolist(),
        initial={},
        generator=generator,
    )
    scale = lora_scale(alpha, config.rank)
    for module in workload.modules:
        A, B = workload.kaiming_A(config.rank), workload.small_B(config.rank)
        workload.initial[module] = LoRAFactors(A=A, B=B, scale=scale)
    return workload


def lora_update(workload: Workload, client: int, module: str) -> LoRAFactors:
    rank, scale = workload.ranks[client][module], workload.scales[client][module]
    return LoRAFactors(A=workload.kaiming_A(rank), B=workload.small_B(rank), scale=scale)


def shared_a_update(workload: Workload, client: int, module: str) -> SharedA:
    rank, scale = workload.ranks[client][module], workload.scales[client][module]
    return SharedA(A=workload.kaiming_A(rank), scale=scale)


def trained_b_update(workload: Workload, client: int, module: str) -> TrainedB:
    rank, scale = workload.ranks[client][module], workload.scales[client][module]
    return TrainedB(B=workload.small_B(rank), scale=scale)


def sb_core_update(workload: Workload, client: int, module: str) -> SBCore:
    """R_0 = s I (`FedSB.init_state` of the initial adapter) moved on its leading r_i x r_i block."""
    initial = workload.initial[module]
    rank = workload.ranks[client][module]
    R = initial.scale * torch.eye(initial.rank, device=workload.device)
    noise = torch.randn(rank, rank, generator=workload.generator, device=workload.device)
    R[:rank, :rank] += noise * initial.scale * SB_CORE_STEP
    return SBCore(R=R, rank=rank)


@dataclass(frozen=True)
class UpdateKind:
    """How the benchmark builds one kind of client update, and whether a dense baseline applies."""

    make_update: Callable[[Workload, int, str], ModuleUpdate]
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
            modules={
                module: kind.make_update(workload, client, module)
                for module in workload.ranks[client]
            },
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


@dataclass(frozen=True)
class ModuleTerms:
    """One module's clients T_m (those that trained it) and their weights p_i / sum_{T_m} p_j."""

    module: str
    trainers: ClientUpdates
    weights: Tensor


def module_terms(updates: list[ClientUpdate], modules: Sequence[str]) -> list[ModuleTerms]:
    """The terms of each module that some client trained."""
    batch = ClientUpdates(updates)
    terms = []
    for module in modules:
        trainers = batch.trainers(module)
        if trainers:
            terms.append(ModuleTerms(module, trainers, example_weights(trainers)))
    return terms


def naive_dense_sum(terms: Sequence[ModuleTerms]) -> None:
    """The reference codes' way: per module, a Python loop over clients adding p_i s_i B_i A_i."""
    for term in terms:
        first = term.trainers[0].modules[term.module]
        total = first.B.new_zeros(first.shape)
        for update, p in zip(term.trainers, term.weights.tolist()):
            factors = update.modules[term.module]
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


def measure_baselines(
    updates: list[ClientUpdate], modules: Sequence[str], config: BenchConfig
) -> Baselines:
    """The naive loop and the stacked GEMM, each module over the clients that trained it."""
    terms = module_terms(updates, modules)
    naive, _ = timed(lambda: naive_dense_sum(terms), config.device, config.repeats)
    stacks = [stack_adapters(t.trainers, t.weights, t.module) for t in terms]
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
    plan: ClientPlan,
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
    largest = workload.largest_client()
    payload = rule.client_payload(result.state, workload.spec(largest, previous.version))
    scale = config.modules_total / config.modules_timed
    seconds *= scale
    naive = scaled(baselines and baselines.naive_seconds, scale)
    return {
        "name": row_name(rule, plan, config),
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
        "module_sample": plan.sample,
        "client_classes": list(dict.fromkeys(plan.classes)),
        "repeats": config.repeats,
    }


def row_name(rule: AggregationRule, plan: ClientPlan, config: BenchConfig) -> str:
    """The rule's name; FlexLoRA's with its SVD path, for "auto" the one it takes on this plan."""
    if not isinstance(rule, FlexLoRA):
        return rule.name
    if rule.svd != "auto":
        return f"{rule.name} ({rule.svd})"
    module = plan.modules[0]
    inner_rank = sum(ranks[module] for ranks in plan.ranks if module in ranks)
    taken = "exact" if rule.exact_path(inner_rank, config.rank) else "randomized"
    return f"{rule.name} (auto: {taken})"


# ---- the benchmark --------------------------------------------------------------------------------


def selected_rules(config: BenchConfig) -> list[AggregationRule]:
    """The rules to time, FlexLoRA once per SVD path asked for."""
    available = implemented_methods()
    names = config.methods or tuple(available)
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ConfigError(f"no rule {unknown} to benchmark; implemented rules: {available}")
    rules = []
    for name in names:
        if name == FlexLoRA.name and config.flexlora_svd:
            rules.extend(make_rule(name, svd=path) for path in config.flexlora_svd)
        else:
            rules.append(make_rule(name))
    return rules


def rules_by_plan(
    rules: list[AggregationRule], config: BenchConfig, clients: int
) -> list[tuple[ClientPlan, list[AggregationRule]]]:
    """The rules grouped by their client plan, in the order of first appearance."""
    groups: list[tuple[ClientPlan, list[AggregationRule]]] = []
    for rule in rules:
        plan = client_plan(rule, config, clients)
        group = next((group for known, group in groups if known == plan), None)
        if group is None:
            groups.append((plan, [rule]))
        else:
            group.append(rule)
    return groups


def iter_aggregate_benchmark(config: BenchConfig) -> Iterator[dict]:
    """Yield one result row per (client count, rule) as it is measured."""
    rules = selected_rules(config)
    for clients in config.clients:
        for plan, planned in rules_by_plan(rules, config, clients):
            workload = build_workload(config, clients, plan)
            for update_kind in dict.fromkeys(rule.update_kind for rule in planned):
                kind = UPDATE_KINDS[update_kind]
                updates = client_updates(workload, kind)
                baselines = (
                    measure_baselines(updates, workload.modules, config)
                    if kind.dense_baseline
                    else None
                )
                for rule in planned:
                    if rule.update_kind is update_kind:
                        yield measure_rule(rule, plan, workload, updates, baselines, config)
                del updates
            del workload


def run_aggregate_benchmark(config: BenchConfig) -> list[dict]:
    """Every result row (see the module docstring for the keys)."""
    return list(iter_aggregate_benchmark(config))
