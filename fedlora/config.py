"""A run's configuration: every key of Flower's ``run_config`` defined once, with its type,
default and help text.

`RunConfig` holds the keys the ClientApp and the ServerApp both read; `ServerAppSettings` the
ServerApp's own (where the run is written, how base changes travel, resume). Each field is the key
with ``-`` for ``_``, declared with `key`: default, help text, and the values it allows. The
reference of every key, ``docs/config.md``, is generated from these definitions
(`fedlora.config_reference`). `RunConfig.from_flower` refuses unknown keys (suggesting the
closest known one) and values of the wrong type or out of range, naming the key. Three defaults
follow the model and data when left unset (`fedlora.models.model_defaults`): ``task`` (a named model's
own; else the model's head, or the dataset's columns), ``target-modules`` (``q_proj,v_proj`` for
the named causal LMs, ``query,value`` for the named classifiers, else what peft knows for the
architecture) and ``modules-to-save`` (none for causal LM; ``classifier,pooler`` for the named
classifiers, else the head the architecture's sequence classifier adds: ``score`` for GPT-2 and
Llama, ``classifier`` for RoBERTa). Checks that depend on the methods (the strategy's name, what
it supports) are `fedlora.method_config`'s.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fedlora.data.columns import INPUT, INSTRUCTION, LABEL, RESPONSE, TEXT
from fedlora.errors import ConfigError
from fedlora.run_records.tracking import tracker_names
from fedlora.training.lr_schedule import LR_SCHEDULES

Scalar = int | float | str | bool
"""A run-config value (Flower's scalar user-config values)."""

TASKS = ("classification", "causal-lm")
SERVER_OPTIMIZERS = ("sgd", "adam", "yogi")
DP_ACCOUNTANTS = ("rdp", "prv")
DP_GRAD_SAMPLE_MODES = ("hooks", "ghost")
PARTITIONERS = ("iid", "dirichlet", "shard")
GENERATION_METRICS = ("auto", "answer", "rouge-l")
ROBUST_AGGREGATIONS = ("mean", "trimmed-mean", "median")
BASE_CHANGES = ("run-dir", "messages")
BASE_DTYPES = ("float32", "bfloat16")
CPU_AUTOCAST_MODES = ("off", "bfloat16", "auto")
TORCH_COMPILE_MODES = ("none", "blocks", "model")
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
class Range:
    """The values a numeric key allows: ``test`` and how the error message says it."""

    test: Callable[[float], bool]
    text: str


AT_LEAST_1 = Range(lambda value: value >= 1, ">= 1")
AT_LEAST_0 = Range(lambda value: value >= 0, ">= 0")
POSITIVE = Range(lambda value: 0 < value < math.inf, "> 0 and finite")
NOT_NEGATIVE = Range(lambda value: 0 <= value < math.inf, ">= 0 and finite")
FRACTION_BELOW_1 = Range(lambda value: 0 <= value < 1, "in [0, 1)")
FRACTION_UP_TO_1 = Range(lambda value: 0 < value <= 1, "in (0, 1]")
FRACTION_BELOW_HALF = Range(lambda value: 0 <= value < 0.5, "in [0, 0.5)")
PROBABILITY = Range(lambda value: 0 < value < 1, "in (0, 1)")
ABOVE_0 = Range(lambda value: value > 0, "> 0")
SEED_OR_SECRET = Range(lambda value: value >= -1, ">= 0, or -1 for secret noise")
SEED_OR_RUN_SEED = Range(lambda value: value >= -1, ">= 0, or -1 for seed")


def key(
    default: Scalar | None, help: str, allowed: Range | None = None, choices: Iterable[str] = ()
) -> Any:
    """A run-config key's definition: its default, its help text, and a numeric range or the
    choices it allows (the strategy's are the methods', checked by `fedlora.method_config`)."""
    metadata = {"help": help, "range": allowed, "choices": tuple(choices)}
    return dataclasses.field(default=default, metadata=metadata)


def kebab(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True)
class RunConfig:
    """The run's settings; each field is the ``run_config`` key with ``-`` for ``_``."""

    strategy: str = key(
        "fedex",
        "the aggregation method (docs/methods.md)",
    )
    num_server_rounds: int = key(5, "federated rounds", AT_LEAST_1)
    model: str = key(
        "minilm",
        "minilm, tiny-bert (classification), smollm2, tiny-llama, llama-400m (causal LM), a local folder or a cached Hugging Face id",
    )
    task: str = key(
        "",
        "classification or causal-lm (empty: the named model's, else the model's head, else the data's columns; docs/data.md)",
    )
    dataset: str = key(
        "bbcnews",
        "bbcnews, bbc-topic, bbc-headline, json:PATH, csv:PATH, parquet:PATH, a save_to_disk folder or hf:NAME (docs/data.md)",
    )
    eval_dataset: str = key(
        "",
        "the server's evaluation set, any dataset spec, read like the dataset (empty: server-eval-fraction of the dataset)",
    )
    text_column: str = key(TEXT, "the data's column of text")
    label_column: str = key(LABEL, "the data's column of class labels")
    instruction_column: str = key(INSTRUCTION, "the data's column of instructions")
    input_column: str = key(INPUT, "the data's column of an instruction's input (optional)")
    response_column: str = key(RESPONSE, "the data's column of responses")
    partitioner: str = key("dirichlet", "how the clients' shares are drawn", choices=PARTITIONERS)
    dirichlet_alpha: float = key(
        0.3, "the Dirichlet concentration over labels (smaller: more skewed)", POSITIVE
    )
    num_shards_per_partition: int = key(
        2, "label-sorted shards per client (shard partitioner)", AT_LEAST_1
    )
    test_fraction: float = key(
        0.2, "each client's held-out share for its own evaluation", FRACTION_BELOW_1
    )
    server_eval_fraction: float = key(
        0.1, "the examples the server holds out before partitioning", FRACTION_BELOW_1
    )
    lora_rank: int = key(8, "every client's LoRA rank when rank-profile is empty", AT_LEAST_1)
    lora_alpha: float = key(
        16.0, "LoRA's alpha: the scale is alpha / rank (alpha / sqrt(rank) with rslora)", POSITIVE
    )
    rslora: bool = key(False, "rank-stabilized scaling alpha / sqrt(rank)")
    rank_profile: str = key(
        "",
        "client ranks as rank:fraction pairs, e.g. 4:0.3,8:0.5,16:0.2 (empty: lora-rank for all)",
    )
    target_modules: str | None = key(
        None,
        "modules given LoRA adapters, comma-separated (unset: q_proj,v_proj for the named causal LMs, query,value for the named classifiers, else peft's defaults for the architecture)",
    )
    modules_to_save: str | None = key(
        None,
        "modules trained whole, comma-separated (unset: none for causal LM; classifier,pooler for the named classifiers, else the head of the architecture's sequence classifier, e.g. score for GPT-2 and Llama)",
    )
    max_length: int = key(96, "tokens per example", AT_LEAST_1)
    local_steps: int = key(3, "optimizer steps a client takes per round", AT_LEAST_1)
    batch_size: int = key(16, "examples per batch", AT_LEAST_1)
    eval_batch_size: int = key(
        0,
        "examples per evaluation batch, 0 for batch-size (on a GPU larger ones launch fewer kernels)",
        AT_LEAST_0,
    )
    learning_rate: float = key(5e-3, "AdamW's learning rate", POSITIVE)
    weight_decay: float = key(0.0, "AdamW's weight decay", NOT_NEGATIVE)
    gradient_accumulation_steps: int = key(
        1, "batches whose gradients each optimizer step sums", AT_LEAST_1
    )
    gradient_checkpointing: bool = key(
        False, "recompute activations in the backward pass (less memory)"
    )
    pack_sequences: bool = key(
        False,
        "causal LM on text: train on the client's texts joined (each ending with EOS) and cut into rows of max-length tokens, every position labelled: no padding, one batch shape (not with instruction data or dp-sample)",
    )
    lr_schedule: str = key(
        "constant",
        "after warm-up the rate stays (constant) or falls linearly (linear)",
        choices=LR_SCHEDULES,
    )
    warmup_steps: int = key(
        0, "optimizer steps of the run over which the rate rises to learning-rate", AT_LEAST_0
    )
    seed: int = key(0, "the seed of partitions, initial weights, sampling and noise", AT_LEAST_0)
    data_seed: int = key(
        -1,
        "the seed of the server's hold-out, the partitions and the clients' splits instead of seed (-1: seed)",
        SEED_OR_RUN_SEED,
    )
    fraction_train: float = key(
        1.0, "the share of nodes sampled to train each round", FRACTION_UP_TO_1
    )
    fraction_evaluate: float = key(
        1.0, "the share of nodes sampled to evaluate each round", FRACTION_UP_TO_1
    )
    min_train_nodes: int = key(2, "the fewest nodes a training round waits for", AT_LEAST_1)
    min_evaluate_nodes: int = key(2, "the fewest nodes an evaluation round waits for", AT_LEAST_1)
    device: str = key("auto", "auto, cpu, cuda or cuda:N")
    num_threads: int = key(1, "torch's CPU threads per client", AT_LEAST_1)
    base_dtype: str = key(
        "float32",
        "the frozen base's weights of a LoRA client on CUDA: float32 (cast to bf16 at each matmul by autocast) or bfloat16 (stored so; the LoRA factors, the head and the base shift stay float32; the CPU keeps float32)",
        choices=BASE_DTYPES,
    )
    cpu_autocast: str = key(
        "off",
        "bf16 autocast of the forward passes on the CPU (training and evaluation; CUDA always autocasts): off (float32), bfloat16, or auto (bfloat16 where the CPU multiplies it natively, AMX or AVX512-BF16, and not under dp-sample; float32 elsewhere, where it would be emulated); the weights, the LoRA factors and the optimizer stay float32",
        choices=CPU_AUTOCAST_MODES,
    )
    torch_compile: str = key(
        "none",
        "torch.compile a LoRA client's model on CUDA: none, blocks (each repeated layer: seconds to compile) or model (the whole model: the fastest steps, about a minute to compile per worker)",
        choices=TORCH_COMPILE_MODES,
    )
    dp_sample: bool = key(False, "sample-level DP: DP-SGD with Opacus (docs/privacy.md)")
    dp_noise_multiplier: float = key(
        1.0, "DP-SGD's noise multiplier (unless dp-target-epsilon is set)", NOT_NEGATIVE
    )
    dp_target_epsilon: float = key(
        0.0,
        "the epsilon DP-SGD's noise is calibrated to over dp-rounds (0: use dp-noise-multiplier)",
        NOT_NEGATIVE,
    )
    dp_delta: float = key(1e-5, "sample-level DP's delta", PROBABILITY)
    dp_max_grad_norm: float = key(1.0, "the per-example gradient clip", ABOVE_0)
    dp_poisson_sampling: bool = key(True, "Poisson-sample each DP-SGD batch")
    dp_accountant: str = key("rdp", "Opacus's privacy accountant", choices=DP_ACCOUNTANTS)
    dp_grad_sample_mode: str = key(
        "hooks", "how Opacus computes per-example gradients", choices=DP_GRAD_SAMPLE_MODES
    )
    dp_rounds: int = key(
        0, "rounds dp-target-epsilon is spread over (0: num-server-rounds)", NOT_NEGATIVE
    )
    max_epsilon: float = key(
        0.0, "a client stops training past this epsilon (0: no limit)", NOT_NEGATIVE
    )
    dp_client: bool = key(
        False, "client-level DP: DP-FedAvg's clipped, noised mean of updates (docs/privacy.md)"
    )
    dp_client_clip: float = key(1.0, "the clip of each client's update", POSITIVE)
    dp_client_noise_multiplier: float = key(
        1.0, "the noise's standard deviation over the clip", NOT_NEGATIVE
    )
    dp_client_delta: float = key(1e-5, "client-level DP's delta", PROBABILITY)
    dp_client_noise_seed: int = key(
        -1, "the server noise's seed (-1: secret noise)", SEED_OR_SECRET
    )
    dp_client_init_clip: float = key(
        1.0, "the clip of the round-0 step (Fed-SB's initial cores)", POSITIVE
    )
    round_timeout: float = key(
        3600.0, "seconds a round waits for replies; late nodes are dropped", POSITIVE
    )
    max_examples_per_client: int = key(
        10_000_000,
        "the largest example count a reply may report; one above it is dropped",
        AT_LEAST_1,
    )
    robust_norm_bound: float = key(
        0.0, "the largest norm of a client's change (0: off)", NOT_NEGATIVE
    )
    robust_norm_median_multiple: float = key(
        0.0,
        "the largest norm of a client's change as a multiple of the round's median (0: off)",
        NOT_NEGATIVE,
    )
    robust_aggregation: str = key(
        "mean",
        "how client factors are combined where the strategy averages them",
        choices=ROBUST_AGGREGATIONS,
    )
    robust_trim_fraction: float = key(
        0.1, "the share cut from each end by trimmed-mean", FRACTION_BELOW_HALF
    )
    server_optimizer: str = key(
        "sgd",
        "the server optimizer over the aggregated update, for strategies that take one",
        choices=SERVER_OPTIMIZERS,
    )
    server_lr: float = key(1.0, "the server optimizer's learning rate", POSITIVE)
    server_momentum: float = key(
        0.0, "the server optimizer's momentum (sgd: FedAvgM)", NOT_NEGATIVE
    )
    server_beta1: float = key(0.9, "adam and yogi's first-moment decay", FRACTION_BELOW_1)
    server_beta2: float = key(0.99, "adam and yogi's second-moment decay", FRACTION_BELOW_1)
    server_eps: float = key(1e-3, "adam and yogi's adaptivity constant tau", POSITIVE)
    fedprox_mu: float = key(
        0.0,
        "FedProx's proximal term mu / 2 ||w - w_0||^2 in the clients' loss (0: off)",
        NOT_NEGATIVE,
    )
    checkpoint_every: int = key(
        1, "the server checkpoints every k rounds and after the last", AT_LEAST_1
    )
    evaluate_every: int = key(
        1,
        "the clients' and the server's evaluation every k rounds and after the last (the other rounds' rows hold nulls; docs/metrics.md)",
        AT_LEAST_1,
    )
    generation_every: int = key(
        0,
        "generation evaluation every k rounds and after the last (0: off; a multiple of evaluate-every; instruction data)",
        AT_LEAST_0,
    )
    max_new_tokens: int = key(32, "tokens generated per prompt", AT_LEAST_1)
    generation_metric: str = key("auto", "how generations are scored", choices=GENERATION_METRICS)
    client_generation: bool = key(
        False, "generation evaluation on the clients' held-out splits too"
    )
    communication_budget_mb: float = key(
        0.0, "total MB up and down above which a warning is logged (0: none)", NOT_NEGATIVE
    )
    tracking: str = key(
        "tensorboard",
        "live trackers of each round's row, comma-separated: tensorboard, mlflow, wandb or none (docs/metrics.md)",
    )

    def __post_init__(self) -> None:
        if not self.task:
            object.__setattr__(self, "task", default_task(self))
        if self.target_modules is None:
            object.__setattr__(self, "target_modules", default_targets(self.model, self.task))
        if self.modules_to_save is None:
            object.__setattr__(self, "modules_to_save", default_head(self.model, self.task))
        check_defined_values(self)
        check_run_values(self)

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Scalar]) -> RunConfig:
        """Parse Flower's run_config (without the ServerApp's keys); unknown keys and ill-typed
        values raise `ConfigError`."""
        return cls(**field_values(cls, run_config, also_known=SERVER_APP_KEYS))

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

    def evaluates(self, server_round: int) -> bool:
        """Whether the clients and the server evaluate in ``server_round`` (``evaluate-every``)."""
        return every_k_rounds(server_round, self.evaluate_every, self.num_server_rounds)

    @property
    def partition_seed(self) -> int:
        """The seed of the data's splits: ``data-seed``, else ``seed``."""
        return self.seed if self.data_seed < 0 else self.data_seed

    @property
    def evaluation_batch_size(self) -> int:
        """Examples per evaluation batch: ``eval-batch-size``, else ``batch-size``."""
        return self.eval_batch_size or self.batch_size

    @property
    def max_rank(self) -> int:
        """The largest rank any client may get from the profile or ``lora-rank``."""
        profile = parse_rank_profile(self.rank_profile)
        return max(rank for rank, _ in profile) if profile else self.lora_rank


@dataclass(frozen=True)
class ServerAppSettings:
    """The ServerApp's own run-config keys (the ClientApp ignores them)."""

    run_dir: str = key(
        "",
        "the run directory (empty: runs/flwr/RUN_ID; fedlora commands set it from --out)",
    )
    base_changes: str = key(
        "run-dir",
        "how FedEx-LoRA's and FLoRA's base changes reach the clients: files in the run directory (one machine) or in the messages",
        choices=BASE_CHANGES,
    )
    resume: bool = key(False, "continue the run in run-dir from its last checkpoint")

    def __post_init__(self) -> None:
        check_defined_values(self)

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Scalar]) -> ServerAppSettings:
        """The ServerApp's keys of Flower's run_config (the others are `RunConfig`'s)."""
        return cls(**field_values(cls, server_app_values(run_config)))


SERVER_APP_KEYS = tuple(kebab(field.name) for field in dataclasses.fields(ServerAppSettings))
"""Run-config keys of the ServerApp's own (not `RunConfig` fields)."""
RUN_KEYS = tuple(kebab(field.name) for field in dataclasses.fields(RunConfig))


def server_app_values(run_config: Mapping[str, Scalar]) -> dict[str, Scalar]:
    return {key: value for key, value in run_config.items() if key in SERVER_APP_KEYS}


def without_server_app_keys(run_config: Mapping[str, Scalar]) -> dict[str, Scalar]:
    """The run config less the ServerApp's own keys: what `RunConfig.from_flower` takes."""
    return {key: value for key, value in run_config.items() if key not in SERVER_APP_KEYS}


def field_values(
    cls: type, run_config: Mapping[str, Scalar], also_known: Iterable[str] = ()
) -> dict[str, Scalar]:
    """The dataclass's field values from kebab-case keys, each of its type; an unknown key raises
    `ConfigError` suggesting the closest known one (``also_known``: keys read elsewhere)."""
    fields = {kebab(field.name): field for field in dataclasses.fields(cls)}
    for key in run_config:
        if key not in fields:
            raise unknown_key(key, [*fields, *also_known])
    return {
        fields[key].name: typed_value(key, value, field_type(fields[key]))
        for key, value in run_config.items()
    }


def unknown_key(key: str, known: Iterable[str], where: str = "") -> ConfigError:
    """The error for an unknown key: the closest known key suggested, if one is close."""
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else " (docs/config.md lists every key)"
    return ConfigError(f"unknown {where}key {key!r}{hint}")


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
    from fedlora.models.model_defaults import inferred_task  # reads the model's files and the data

    return inferred_task(config)


def default_targets(model: str, task: str) -> str:
    """The named causal LMs' ``q_proj,v_proj`` and classifiers' ``query,value``; else peft's
    default LoRA targets for the model's architecture."""
    if model in NAMED_MODELS:
        return CAUSAL_LM_TARGETS if task == "causal-lm" else CLASSIFICATION_TARGETS
    from fedlora.models.model_defaults import peft_target_modules  # reads the model's config file

    return ",".join(peft_target_modules(model))


def default_head(model: str, task: str) -> str:
    """No head for a causal LM; the named classifiers' ``classifier,pooler``; else the head that
    the sequence classifier of the model's architecture adds (``score`` for GPT-2 and Llama)."""
    if task != "classification":
        return ""
    if model in NAMED_MODELS:
        return CLASSIFICATION_HEAD
    from fedlora.models.model_defaults import classification_head  # reads the model's config file

    return ",".join(classification_head(model))


def every_k_rounds(server_round: int, every: int, num_rounds: int) -> bool:
    """Whether ``server_round`` is a multiple of ``every`` or the last of ``num_rounds`` (rounds
    count from 1)."""
    return server_round >= 1 and (server_round % every == 0 or server_round == num_rounds)


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


def check_defined_values(settings: RunConfig | ServerAppSettings) -> None:
    """Raise `ConfigError` naming the first key whose value its definition does not allow."""
    for field in dataclasses.fields(settings):
        value, choices, allowed = (
            getattr(settings, field.name),
            field.metadata["choices"],
            field.metadata["range"],
        )
        if choices and value not in choices:
            raise ConfigError(f"{kebab(field.name)} = {value!r}: choose one of {list(choices)}")
        if allowed is not None and not allowed.test(value):
            raise ConfigError(f"{kebab(field.name)} must be {allowed.text}, got {value!r}")


def check_run_values(config: RunConfig) -> None:
    """The checks of `RunConfig` that involve more than one key or a pattern."""
    if not re.fullmatch(DEVICE_PATTERN, config.device):
        raise ConfigError(f"device = {config.device!r}: choose auto, cpu, cuda or cuda:N")
    if config.task not in TASKS:
        raise ConfigError(f"task = {config.task!r}: choose one of {list(TASKS)}")
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
    if config.client_generation and not config.generation_every:
        raise ConfigError("client-generation needs generation-every > 0")
    if config.generation_every % config.evaluate_every:
        raise ConfigError(
            f"generation-every = {config.generation_every} must be a multiple of evaluate-every "
            f"= {config.evaluate_every}: generation evaluation happens in evaluation rounds"
        )
    check_fast_training(config)
    check_packing(config)


def check_packing(config: RunConfig) -> None:
    """Packed rows are causal-LM text, and mix examples: sample-level DP protects examples."""
    if config.pack_sequences and config.task != "causal-lm":
        raise ConfigError(f"pack-sequences packs causal-LM text, not task {config.task!r}")
    if config.pack_sequences and config.dp_sample:
        raise ConfigError(
            "pack-sequences is not supported with dp-sample: a packed row mixes examples, and "
            "DP-SGD clips and counts each example on its own"
        )


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


def check_fast_training(config: RunConfig) -> None:
    """bfloat16 bases, the CPU's bf16 autocast and torch.compile train plainly: not under Opacus'
    DP-SGD, whose per-example gradient hooks they are not tested with."""
    if config.dp_sample and config.base_dtype != "float32":
        raise ConfigError(f"base-dtype = {config.base_dtype!r} is not supported with dp-sample")
    if config.dp_sample and config.cpu_autocast == "bfloat16":
        raise ConfigError(f"cpu-autocast = {config.cpu_autocast!r} is not supported with dp-sample")
    if config.dp_sample and config.torch_compile != "none":
        raise ConfigError(
            f"torch-compile = {config.torch_compile!r} is not supported with dp-sample"
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
