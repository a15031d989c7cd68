"""A run's configuration: Flower's ``run_config`` (kebab-case keys) as a checked, frozen dataclass.

Every field has the demo's default; `RunConfig.from_flower` refuses unknown keys and values of the
wrong type or out of range, naming the key. Two defaults follow the model and task when left
unset: ``target-modules`` (``q_proj,v_proj`` for Llama-like causal LMs, else ``query,value``) and
``modules-to-save`` (``classifier,pooler`` for classification, none for causal LM).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from fedlora.client_dp import check_client_dp_rule
from fedlora.errors import ConfigError
from fedlora.generation import GENERATION_METRICS
from fedlora.lr_schedule import LR_SCHEDULES
from fedlora.messages import Scalar
from fedlora.rules import RULES
from fedlora.rules.base import check_robustness
from fedlora.rules.robust import Robustness
from fedlora.server_optimizer import ServerOptimizer

TASKS = ("classification", "causal-lm")
DP_ACCOUNTANTS = ("rdp", "prv")
DP_GRAD_SAMPLE_MODES = ("hooks", "ghost")
PARTITIONERS = ("iid", "dirichlet", "shard")
NAMED_MODELS = {
    "minilm": "classification",
    "smollm2": "causal-lm",
    "tiny-bert": "classification",
    "tiny-llama": "causal-lm",
    "llama-400m": "causal-lm",
}
"""Models fedlora knows by name, with the one task each supports."""
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
CLASSIFICATION_TARGETS = "query,value"
CAUSAL_LM_TARGETS = "q_proj,v_proj"
CLASSIFICATION_HEAD = "classifier,pooler"
PROFILE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class RunConfig:
    """The run's settings; each field is the ``run_config`` key with ``-`` for ``_``."""

    strategy: str = "fedex"
    num_server_rounds: int = 5
    model: str = "minilm"
    task: str = "classification"
    dataset: str = "bbcnews"
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.3
    num_shards_per_partition: int = 2
    test_fraction: float = 0.2
    server_eval_fraction: float = 0.1
    lora_rank: int = 8
    lora_alpha: float = 16.0
    rslora: bool = False
    rank_profile: str = ""
    target_modules: str | None = None
    modules_to_save: str | None = None
    max_length: int = 96
    local_steps: int = 3
    batch_size: int = 16
    learning_rate: float = 5e-3
    weight_decay: float = 0.0
    # optimizer steps: each of the local-steps accumulates gradient-accumulation-steps batches;
    # the learning rate warms up over warmup-steps of the run's steps, then stays (constant) or
    # falls linearly (fedlora.lr_schedule)
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    seed: int = 0
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    min_evaluate_nodes: int = 2
    device: str = "auto"
    num_threads: int = 1
    # sample-level DP (Opacus)
    dp_sample: bool = False
    dp_noise_multiplier: float = 1.0
    dp_target_epsilon: float = 0.0
    dp_delta: float = 1e-5
    dp_max_grad_norm: float = 1.0
    dp_poisson_sampling: bool = True
    dp_accountant: str = "rdp"
    dp_grad_sample_mode: str = "hooks"
    dp_rounds: int = 0
    max_epsilon: float = 0.0
    # client-level DP (DP-FedAvg)
    dp_client: bool = False
    dp_client_clip: float = 1.0
    dp_client_noise_multiplier: float = 1.0
    dp_client_delta: float = 1e-5
    dp_client_noise_seed: int = -1
    dp_client_init_clip: float = 1.0
    # deployment: seconds a round waits for replies (Flower's default, 3600); late nodes are dropped
    round_timeout: float = 3600.0
    # the largest example count one client may report; a reply above it is dropped
    max_examples_per_client: int = 10_000_000
    # robust aggregation (`fedlora.rules.robust`): norm bounds of each client's change (0: off)
    # and the combination of client factors where the strategy averages factors
    robust_norm_bound: float = 0.0
    robust_norm_median_multiple: float = 0.0
    robust_aggregation: str = "mean"
    robust_trim_fraction: float = 0.1
    # the server optimizer over the aggregated update (`fedlora.server_optimizer`; strategies that
    # declare one) and FedProx's proximal term mu / 2 ||w - w_0||^2 in the clients' loss (0: off)
    server_optimizer: str = "sgd"
    server_lr: float = 1.0
    server_momentum: float = 0.0
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_eps: float = 1e-3
    fedprox_mu: float = 0.0
    # the server checkpoints the run every k rounds (and after the last), to resume it from
    checkpoint_every: int = 1
    # generation evaluation on the server's held-out set every k rounds and after the last (0: off;
    # instruction data only; fedlora.generation), on the clients' held-out splits too if asked
    generation_every: int = 0
    max_new_tokens: int = 32
    generation_metric: str = "auto"
    client_generation: bool = False
    # total MB (10^6 bytes) up and down over the run above which a warning is logged (0: none)
    communication_budget_mb: float = 0.0

    def __post_init__(self) -> None:
        if self.target_modules is None:
            object.__setattr__(self, "target_modules", default_targets(self.model, self.task))
        if self.modules_to_save is None:
            head = CLASSIFICATION_HEAD if self.task == "classification" else ""
            object.__setattr__(self, "modules_to_save", head)
        check_values(self)

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Scalar]) -> RunConfig:
        """Parse Flower's run_config; unknown keys and ill-typed values raise `ConfigError`."""
        fields = {kebab(field.name): field for field in dataclasses.fields(cls)}
        unknown = sorted(set(run_config) - set(fields))
        if unknown:
            raise ConfigError(f"unknown run_config key(s) {unknown}; known keys: {sorted(fields)}")
        values = {
            fields[key].name: typed_value(key, value, field_type(fields[key]))
            for key, value in run_config.items()
        }
        return cls(**values)

    @property
    def target_module_names(self) -> tuple[str, ...]:
        """``target-modules`` as a tuple of module names."""
        return comma_names(self.target_modules)

    @property
    def head_module_names(self) -> tuple[str, ...]:
        """``modules-to-save`` as a tuple (empty: no head is trained)."""
        return comma_names(self.modules_to_save)

    def rank_for(self, partition_id: int, num_partitions: int, node_rank: int | None = None) -> int:
        """The LoRA rank of a client: its node's own ``lora-rank`` if given, else the profile's.

        A profile "r_1:f_1,...,r_k:f_k" gives about f_j * num_partitions clients rank r_j (the
        largest remainders take the clients left by rounding down; ties go to the earlier entry),
        in blocks of consecutive partition ids in the profile's order. No profile: ``lora-rank``.
        """
        if not 0 <= partition_id < num_partitions:
            raise ConfigError(f"partition id {partition_id} outside 0..{num_partitions - 1}")
        if node_rank is not None:
            if node_rank < 1:
                raise ConfigError(f"node config lora-rank must be >= 1, got {node_rank}")
            return node_rank
        profile = parse_rank_profile(self.rank_profile)
        if not profile:
            return self.lora_rank
        counts = apportion([fraction for _, fraction in profile], num_partitions)
        ranks = [
            rank for (rank, _), count in zip(profile, counts, strict=True) for _ in range(count)
        ]
        return ranks[partition_id]

    @property
    def robustness(self) -> Robustness:
        """The ``robust-*`` keys as the rule's options."""
        return Robustness(
            norm_bound=self.robust_norm_bound,
            norm_median_multiple=self.robust_norm_median_multiple,
            combination=self.robust_aggregation,
            trim_fraction=self.robust_trim_fraction,
        )

    @property
    def server_optimizer_options(self) -> ServerOptimizer:
        """The ``server-*`` keys as a server optimizer (refused when out of range)."""
        return ServerOptimizer(
            kind=self.server_optimizer,
            lr=self.server_lr,
            momentum=self.server_momentum,
            beta1=self.server_beta1,
            beta2=self.server_beta2,
            eps=self.server_eps,
        )

    @property
    def max_rank(self) -> int:
        """The largest rank any client may get from the profile or ``lora-rank``."""
        profile = parse_rank_profile(self.rank_profile)
        return max(rank for rank, _ in profile) if profile else self.lora_rank


def kebab(name: str) -> str:
    return name.replace("_", "-")


def field_type(field: dataclasses.Field) -> type:
    """The scalar type a field holds (``str | None`` fields take strings)."""
    return {"str": str, "int": int, "float": float, "bool": bool}[str(field.type).split(" |")[0]]


def typed_value(key: str, value: Scalar, kind: type) -> Scalar:
    """``value`` as ``kind``; an int passes as a float, nothing else is converted."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(
                f"run_config key {key!r}: an integer of {len(str(abs(value)))} digits is beyond "
                "a float's range"
            ) from None
    if type(value) is not kind:
        raise ConfigError(
            f"run_config key {key!r}: expected {kind.__name__}, got {value!r} "
            f"({type(value).__name__})"
        )
    return value


def default_targets(model: str, task: str) -> str:
    if NAMED_MODELS.get(model, task) == "causal-lm":
        return CAUSAL_LM_TARGETS
    return CLASSIFICATION_TARGETS


def comma_names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_rank_profile(text: str) -> list[tuple[int, float]]:
    """Parse "4:0.3,8:0.7" into [(4, 0.3), (8, 0.7)]: ranks >= 1, fractions > 0 summing to 1."""
    if not text.strip():
        return []
    profile = []
    for entry in text.split(","):
        rank_text, _, fraction_text = entry.partition(":")
        try:
            rank, fraction = int(rank_text), float(fraction_text)
        except ValueError:
            raise ConfigError(
                f"rank-profile {text!r}: entry {entry.strip()!r} is not 'rank:fraction'"
            ) from None
        if rank < 1 or not fraction > 0:
            raise ConfigError(
                f"rank-profile {text!r}: entry {entry.strip()!r} needs rank >= 1, fraction > 0"
            )
        profile.append((rank, fraction))
    total = sum(fraction for _, fraction in profile)
    if not math.isclose(total, 1.0, abs_tol=PROFILE_TOLERANCE):
        raise ConfigError(f"rank-profile {text!r}: fractions sum to {total}, not 1")
    return profile


def apportion(fractions: list[float], total: int) -> list[int]:
    """Integer counts summing to ``total``, nearest to fraction * total (largest remainders)."""
    quotas = [fraction * total for fraction in fractions]
    counts = [math.floor(quota) for quota in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda j: (counts[j] - quotas[j], j))
    for j in by_remainder[: total - sum(counts)]:
        counts[j] += 1
    return counts


RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    **dict.fromkeys(
        (
            "num_server_rounds",
            "num_shards_per_partition",
            "lora_rank",
            "max_length",
            "local_steps",
            "batch_size",
            "gradient_accumulation_steps",
            "min_train_nodes",
            "min_evaluate_nodes",
            "num_threads",
            "max_examples_per_client",
            "checkpoint_every",
            "max_new_tokens",
        ),
        (lambda value: value >= 1, ">= 1"),
    ),
    **dict.fromkeys(
        ("dirichlet_alpha", "lora_alpha", "learning_rate"),
        (lambda value: 0 < value < math.inf, "> 0 and finite"),
    ),
    **dict.fromkeys(
        ("seed", "warmup_steps", "generation_every"), (lambda value: value >= 0, ">= 0")
    ),
    "weight_decay": (lambda value: 0 <= value < math.inf, ">= 0 and finite"),
    **dict.fromkeys(
        ("test_fraction", "server_eval_fraction"), (lambda value: 0 <= value < 1, "in [0, 1)")
    ),
    **dict.fromkeys(
        ("fraction_train", "fraction_evaluate"), (lambda value: 0 < value <= 1, "in (0, 1]")
    ),
    **dict.fromkeys(
        (
            "dp_noise_multiplier",
            "dp_target_epsilon",
            "dp_rounds",
            "max_epsilon",
            "communication_budget_mb",
        ),
        (lambda value: 0 <= value < math.inf, ">= 0 and finite"),
    ),
    "dp_delta": (lambda value: 0 < value < 1, "in (0, 1)"),
    "dp_max_grad_norm": (lambda value: value > 0, "> 0"),
    "round_timeout": (lambda value: 0 < value < math.inf, "> 0 and finite"),
}
"""The numeric fields' allowed ranges."""


CLIENT_DP_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    **dict.fromkeys(
        ("dp_client_clip", "dp_client_init_clip"),
        (lambda value: 0 < value < math.inf, "> 0 and finite"),
    ),
    "dp_client_noise_multiplier": (lambda value: 0 <= value < math.inf, ">= 0 and finite"),
    "dp_client_delta": (lambda value: 0 < value < 1, "in (0, 1)"),
}
"""The client-level DP fields' allowed ranges."""


def check_client_dp(config: RunConfig) -> None:
    """Raise `ConfigError` for a client-level DP value out of range, or ``dp-client`` with a
    strategy whose aggregate one clipped update does not bound (`fedlora.client_dp`)."""
    for name, (allowed, description) in CLIENT_DP_RANGES.items():
        value = getattr(config, name)
        if not allowed(value):
            raise ConfigError(f"{kebab(name)} must be {description}, got {value!r}")
    if config.dp_client_noise_seed < -1:
        raise ConfigError(
            f"dp-client-noise-seed must be >= 0, or -1 for secret noise, got "
            f"{config.dp_client_noise_seed!r}"
        )
    if config.dp_client:
        check_client_dp_rule(config.strategy)


def check_values(config: RunConfig) -> None:
    """Raise `ConfigError` naming the first key whose value is not allowed."""
    choices = {
        "strategy": sorted(RULES),
        "task": TASKS,
        "partitioner": PARTITIONERS,
        "dp_accountant": DP_ACCOUNTANTS,
        "dp_grad_sample_mode": DP_GRAD_SAMPLE_MODES,
        "lr_schedule": LR_SCHEDULES,
        "generation_metric": GENERATION_METRICS,
    }
    for name, allowed in choices.items():
        value = getattr(config, name)
        if value not in allowed:
            raise ConfigError(f"{kebab(name)} = {value!r}: choose one of {list(allowed)}")
    if not re.fullmatch(DEVICE_PATTERN, config.device):
        raise ConfigError(f"device = {config.device!r}: choose auto, cpu, cuda or cuda:N")
    for name, (allowed, description) in RANGES.items():
        value = getattr(config, name)
        if not allowed(value):
            raise ConfigError(f"{kebab(name)} must be {description}, got {value!r}")
    for name in ("model", "dataset", "target_modules"):
        if not getattr(config, name).strip(" ,"):
            raise ConfigError(f"{kebab(name)} must not be empty")
    named_task = NAMED_MODELS.get(config.model)
    if named_task is not None and named_task != config.task:
        raise ConfigError(
            f"model {config.model!r} supports task {named_task!r}, not task {config.task!r}"
        )
    parse_rank_profile(config.rank_profile)
    check_training_steps(config)
    check_client_dp(config)
    robustness = config.robustness
    check_robustness(RULES[config.strategy], robustness)
    if config.dp_client and (robustness.bounds_norms or robustness.combination != "mean"):
        raise ConfigError(
            "robust-* options do not apply with dp-client: client-level DP clips every update and "
            "its analysis assumes the noised mean"
        )
    check_server_optimizer(config)
    if config.client_generation and not config.generation_every:
        raise ConfigError("client-generation needs generation-every > 0")


def check_server_optimizer(config: RunConfig) -> None:
    """``server-*`` in range and only for a strategy that takes a server optimizer;
    ``fedprox-mu`` >= 0 and finite, not with DP-SGD (Opacus sets the gradients itself)."""
    optimizer = config.server_optimizer_options
    if optimizer != ServerOptimizer() and not RULES[config.strategy].takes_server_optimizer:
        takers = sorted(name for name, rule in RULES.items() if rule.takes_server_optimizer)
        raise ConfigError(
            f"server-* options do not apply to strategy {config.strategy!r}; strategies with a "
            f"server optimizer: {takers}"
        )
    if optimizer != ServerOptimizer() and config.dp_client:
        raise ConfigError(
            "server-* options do not apply with dp-client: the private aggregate is applied as "
            "the noised mean its analysis assumes"
        )
    if not 0 <= config.fedprox_mu < math.inf:
        raise ConfigError(f"fedprox-mu must be >= 0 and finite, got {config.fedprox_mu!r}")
    if config.fedprox_mu > 0 and config.dp_sample:
        raise ConfigError(
            "fedprox-mu does not apply with dp-sample: DP-SGD computes each step's gradient from "
            "clipped per-example gradients, which the proximal term is not"
        )


def check_training_steps(config: RunConfig) -> None:
    """Warm-up within the run's optimizer steps; no gradient accumulation under DP-SGD (its
    batches are Poisson-sampled per step: raise ``batch-size`` instead)."""
    total = config.num_server_rounds * config.local_steps
    if config.warmup_steps > total:
        raise ConfigError(
            f"warmup-steps = {config.warmup_steps} exceeds the run's {total} optimizer steps "
            f"(num-server-rounds x local-steps)"
        )
    if config.dp_sample and config.gradient_accumulation_steps > 1:
        raise ConfigError(
            "gradient-accumulation-steps > 1 is not supported with dp-sample (DP-SGD samples "
            "each step's batch itself): raise batch-size instead"
        )
