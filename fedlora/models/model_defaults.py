"""Defaults that follow a model that fedlora does not know by name: its task and LoRA targets.

The task is the model's head when its config names one (``...ForCausalLM`` or ``...LMHeadModel``:
causal LM; ``...ForSequenceClassification``: classification); a model without a head (e.g.
``BertModel``) takes the task the dataset's columns allow: instructions or text alone mean causal
LM, a label with text could be either and is refused as ambiguous. The LoRA targets are peft's
defaults for the model type (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``). A
classifier's trained head (``modules-to-save``) is the one its architecture's sequence classifier
adds (``score`` for GPT-2 and Llama, ``classifier`` for RoBERTa, ``classifier`` and BERT's
``pooler`` for BERT), read from that classifier built on the meta device (no weights).
"""

from __future__ import annotations

import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from fedlora.config import RunConfig
from fedlora.data.columns import INSTRUCTION, LABEL, RESPONSE
from fedlora.data.loading import source_columns
from fedlora.errors import ConfigError
from fedlora.models.base_model import classification_head_names, pretrained_config

CAUSAL_LM_HEADS = ("ForCausalLM", "LMHeadModel")
CLASSIFICATION_HEADS = ("ForSequenceClassification",)


def model_head_task(model: str) -> str | None:
    """The task the model's own head is for (from its config's ``architectures``); None when
    the config names no head of either kind."""
    architectures = pretrained_config(model).architectures or []
    tasks = {
        task
        for architecture in architectures
        for task, heads in (
            ("causal-lm", CAUSAL_LM_HEADS),
            ("classification", CLASSIFICATION_HEADS),
        )
        if architecture.endswith(heads)
    }
    return tasks.pop() if len(tasks) == 1 else None


def inferred_task(config: RunConfig) -> str:
    """The task of a model not known by name: its head's, else the one the data's columns allow.
    Raises `ConfigError` explaining the choice when the data fit both tasks."""
    head_task = model_head_task(config.model)
    if head_task is not None:
        return head_task
    columns = source_columns(config)
    if INSTRUCTION in columns or RESPONSE in columns or LABEL not in columns:
        return "causal-lm"
    architectures = pretrained_config(config.model).architectures
    raise ConfigError(
        f"task cannot be inferred: model {config.model!r} (architectures {architectures}) has "
        f"no classification or causal-LM head, and dataset {config.dataset!r} has a label "
        "beside its text, which fits both classification and causal LM (that keeps the label "
        "to partition by): set task=classification or task=causal-lm"
    )


def peft_target_modules(model: str) -> list[str]:
    """peft's default LoRA target modules for the model's type; refused, with what to set, when
    peft knows none."""
    model_type = pretrained_config(model).model_type
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if not targets:
        raise ConfigError(
            f"target-modules: peft knows no default LoRA targets for model {model!r} (model type "
            f"{model_type!r}); set target-modules to its attention projections, e.g. "
            "target-modules=q_proj,v_proj"
        )
    return list(targets)


def classification_head(model: str) -> list[str]:
    """The head that transformers' sequence classifier for the model's type adds to the base
    (`fedlora.models.base_model.classification_head_names`), found on a copy without weights."""
    config = pretrained_config(model)
    from transformers import AutoModelForSequenceClassification

    try:
        with torch.device("meta"):
            classifier = AutoModelForSequenceClassification.from_config(config)
    except ValueError as error:
        raise ConfigError(
            f"modules-to-save: transformers has no sequence classifier for model {model!r} "
            f"(model type {config.model_type!r}); set modules-to-save to its head's modules"
        ) from error
    return classification_head_names(classifier)
