"""A run's configuration: Flower's ``run_config`` (kebab-case keys) as a checked, frozen dataclass.

Every field has the demo's default; `RunConfig.from_flower` refuses unknown keys and values of the
wrong type or out of range, naming the key. Three defaults follow the model and data when left
unset (`fedlora.model_defaults`): ``task`` (a named model's own; else the model's head, or the
dataset's columns), ``target-modules`` (``q_proj,v_proj`` for the named causal LMs, ``query,value``
for the named classifiers, else what peft knows for the architecture) and ``modules-to-save``
(``classifier,pooler`` for classification, none for causal LM).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from fedlora.client_dp import check_client_dp_rule
from fedlora.columns import INPUT, INSTRUCTION, LABEL, RESPONSE, TEXT
from fedlora.errors import ConfigError
from fedlora.generation import GENERATION_METRICS
from fedlora.lr_schedule import LR_SCHEDULES
from fedlora.messages import Scalar
from fedlora.rules import RULES
from fedlora.rules.base import check_robustness
from fedlora.rules.robust import Robustness
from fedlora.tracking import tracker_names

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
    task: str = ""
    dataset: str = "bbcnews"
    # a separate evaluation set for the server, used instead of a server-eval-fraction hold-out
    eval_dataset: str = ""
    # the columns of one's own data that hold fedlora's text, label, instruction, input, response
    text_column: str = TEXT
    label_column: str = LABEL
    instruction_column: str = INSTRUCTION
    input_column: str = INPUT
    response_column: str = RESPONSE
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
    # the seed of the server's hold-out, the partitions and the clients' splits (-1: seed), so that
    # runs of several seeds can share their data
    data_seed: int = -1
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
    # live tracking of each round's row (fedlora.tracking): tensorboard, mlflow, wandb or none
    tracking: str = "tensorboard"

    def __post_init__(self) -> None:
        if not self.task:
            object.__setattr__(self, "task", default_task(self))
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
    def partition_seed(self) -> int:
        """The seed of the data's splits: ``data-seed``, else ``seed``."""
        return self.seed if self.data_seed < 0 else self.data_seed

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


def default_task(config: RunConfig) -> str:
    """A named model's task; else inferred from the model's head or the dataset's columns."""
    if config.model in NAMED_MODELS:
        return NAMED_MODELS[config.model]
    from fedlora.model_defaults import inferred_task  # reads the model's files and the data

    return inferred_task(config)


def default_targets(model: str, task: str) -> str:
    """The named causal LMs' ``q_proj,v_proj`` and classifiers' ``query,value``; else peft's
    default LoRA targets for the model's architecture."""
    if model in NAMED_MODELS:
        return CAUSAL_LM_TARGETS if task == "causal-lm" else CLASSIFICATION_TARGETS
    from fedlora.model_defaults import peft_target_modules  # reads the model's config file

    return ",".join(peft_target_modules(model))


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
    for name in ("model", "dataset", "target_modules", *COLUMN_KEYS):
        if not getattr(config, name).strip(" ,"):
            raise ConfigError(f"{kebab(name)} must not be empty")
    check_column_mapping(config)
    tracker_names(config.tracking)
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
    if config.data_seed < -1:
        raise ConfigError(f"data-seed must be >= 0, or -1 for seed, got {config.data_seed!r}")
    if config.client_generation and not config.generation_every:
        raise ConfigError("client-generation needs generation-every > 0")


COLUMN_KEYS = {
    "text_column": TEXT,
    "label_column": LABEL,
    "instruction_column": INSTRUCTION,
    "input_column": INPUT,
    "response_column": RESPONSE,
}
"""The column mapping keys and the column each names."""


def column_mapping(config: RunConfig) -> dict[str, str]:
    """{column of one's data: fedlora's column} for the mapping keys that name another column."""
    return {
        getattr(config, key): column
        for key, column in COLUMN_KEYS.items()
        if getattr(config, key) != column
    }


def check_column_mapping(config: RunConfig) -> None:
    """Each mapping key names its own column."""
    named = [getattr(config, key) for key in COLUMN_KEYS]
    repeated = sorted({name for name in named if named.count(name) > 1})
    if repeated:
        raise ConfigError(
            f"column(s) {repeated} named by more than one of "
            f"{[kebab(key) for key in COLUMN_KEYS]}: each key names its own column"
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
