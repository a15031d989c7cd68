"""The bridge between a peft LoRA model and the pure core: adapter, head and base weights.

Module names are peft's module paths, the keys of ``get_peft_model_state_dict`` without
``.lora_A.weight``. Every tensor handed to the core is in ``nn.Linear`` orientation (d_out x d_in):
GPT-2 ``Conv1D`` layers (peft's ``fan_in_fan_out``) store their base weight as (d_in x d_out) and
are transposed here, while peft's lora_A and lora_B are Linear-shaped for both layer kinds.

The head is every parameter of peft's ``modules_to_save``, keyed as in ``get_peft_model_state_dict``
(e.g. ``base_model.model.classifier.weight``), so that it also loads with
``set_peft_model_state_dict``.

Base weights: a client's base is the pretrained weight plus its ``base_shift``. `pretrained_weights`
captures the pretrained base weights once per model, before this module first writes a base (call it
before anything else changes them), and keeps that untouched copy on the model. A base stored in
bfloat16 (``base-dtype``, `fedlora.training.speed`) rounds pretrained + base_shift; the shift itself
stays exact: `apply_client_state` keeps the float32 shift it wrote on the model, and `base_shifts`
reads that one back for such a base.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from torch import Tensor, nn

from fedlora.lora.adapter import Adapter, LoRAFactors
from fedlora.lora.client_state import ClientState

DEFAULT_ADAPTER = "default"
PRETRAINED_ATTRIBUTE = "fedlora_pretrained_weights"
SHIFT_ATTRIBUTE = "fedlora_base_shift"
EXACT_DTYPES = (torch.float32, torch.float64)
SCALE_TOLERANCE = 1e-9
_FOUND: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, str], dict]] = (
    weakref.WeakKeyDictionary()
)
"""Per peft model, its LoRA layers and head parameters by (kind, adapter name), found once: a walk
of a large model's modules costs milliseconds and a client's step reads them many times a round.
A peft model's adapters are injected when it is made (`fedlora.models.base_model.with_lora`) and
never added or swapped, so what was found stays true; a copy of the model is a new key. Any other
module is walked on every call."""


def _found_once(model: nn.Module, kind: str, adapter_name: str, find) -> dict:
    """``find(model, adapter_name)``, remembered for a peft model; a fresh dict each call."""
    if not hasattr(model, "peft_config"):
        return find(model, adapter_name)
    found = _FOUND.setdefault(model, {})
    key = (kind, adapter_name)
    if key not in found:
        found[key] = find(model, adapter_name)
    return dict(found[key])


class ModelMismatchError(ValueError):
    """Tensors do not fit the peft model: a module or head parameter missing, a rank or shape off."""


# ---- the model's LoRA layers ---------------------------------------------------------------------


def lora_layers(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, LoraLinear]:
    """The layers holding ``adapter_name`` by module path; refuses all but plain LoRA on Linear
    (checked on every call: a layer's state, merged or not, can change)."""
    config = getattr(model, "peft_config", {}).get(adapter_name)
    if getattr(config, "bias", "none") != "none":
        raise ModelMismatchError(
            f"adapter {adapter_name!r} trains base biases (bias={config.bias!r}); only 'none' is "
            "supported (put trained full parameters in modules_to_save)"
        )
    layers = _found_once(model, "lora", adapter_name, _find_lora_layers)
    if not layers:
        raise ModelMismatchError(f"the model has no LoRA layers for adapter {adapter_name!r}")
    for name, layer in layers.items():
        _check_supported(name, layer, adapter_name)
    return layers


def _find_lora_layers(model: nn.Module, adapter_name: str) -> dict[str, LoraLayer]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A
    }


def _check_supported(name: str, layer: LoraLayer, adapter_name: str) -> None:
    if not isinstance(layer, LoraLinear):
        raise ModelMismatchError(
            f"module {name!r}: peft layer {type(layer).__name__} is not supported "
            "(only nn.Linear and GPT-2 Conv1D base layers)"
        )
    if adapter_name in layer.lora_variant:
        variant = type(layer.lora_variant[adapter_name]).__name__
        raise ModelMismatchError(f"module {name!r}: LoRA variant {variant} (e.g. DoRA) unsupported")
    if layer.lora_bias.get(adapter_name, False):
        raise ModelMismatchError(f"module {name!r}: lora_bias is not supported")
    if layer.merged:
        raise ModelMismatchError(
            f"module {name!r}: adapters {layer.merged_adapters} are merged into the base; "
            "unmerge them first"
        )


def _to_linear(weight: Tensor, fan_in_fan_out: bool) -> Tensor:
    """A base weight in Linear orientation; Conv1D stores (d_in x d_out). Also turns it back."""
    return weight.T if fan_in_fan_out else weight


# ---- adapter --------------------------------------------------------------------------------------


def read_adapter(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> Adapter:
    """A copy of every module's A, B and the scale peft applies (alpha/r or alpha/sqrt(r))."""
    return {
        name: LoRAFactors(
            A=layer.lora_A[adapter_name].weight.detach().clone(),
            B=layer.lora_B[adapter_name].weight.detach().clone(),
            scale=float(layer.scaling[adapter_name]),
        )
        for name, layer in lora_layers(model, adapter_name).items()
    }


def write_adapter(model: nn.Module, adapter: Adapter, adapter_name: str = DEFAULT_ADAPTER) -> None:
    """Copy A and B into the model; the module set, ranks, shapes and scales must match it."""
    layers = lora_layers(model, adapter_name)
    _check_adapter(layers, adapter, adapter_name)
    _copy_adapter(layers, adapter, adapter_name)


def _check_adapter(layers: dict[str, LoraLinear], adapter: Adapter, adapter_name: str) -> None:
    _check_same_names("adapter", set(adapter), set(layers))
    for name, factors in adapter.items():
        _check_factors(name, layers[name], factors, adapter_name)


@torch.no_grad()
def _copy_adapter(layers: dict[str, LoraLinear], adapter: Adapter, adapter_name: str) -> None:
    for name, factors in adapter.items():
        layers[name].lora_A[adapter_name].weight.copy_(factors.A)
        layers[name].lora_B[adapter_name].weight.copy_(factors.B)


def _check_factors(name: str, layer: LoraLinear, factors: LoRAFactors, adapter_name: str) -> None:
    rank = layer.r[adapter_name]
    if factors.rank != rank:
        raise ModelMismatchError(
            f"module {name!r}: adapter rank {factors.rank}, the model's layer has rank {rank}"
        )
    expected = (layer.out_features, layer.in_features)
    if factors.shape != expected:
        raise ModelMismatchError(
            f"module {name!r}: factors for a {factors.shape} weight, the layer's is {expected} "
            "(d_out x d_in)"
        )
    scale = float(layer.scaling[adapter_name])
    if not math.isclose(factors.scale, scale, rel_tol=SCALE_TOLERANCE):
        raise ModelMismatchError(
            f"module {name!r}: adapter scale {factors.scale}, the model's layer applies {scale}"
        )


def _check_same_names(what: str, given: set[str], expected: set[str]) -> None:
    unknown, missing = sorted(given - expected), sorted(expected - given)
    if unknown:
        raise ModelMismatchError(f"{what}: the model has no {unknown}")
    if missing:
        raise ModelMismatchError(f"{what}: missing the model's {missing}")


# ---- head (modules_to_save) -----------------------------------------------------------------------


def _head_parameters(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """The trained copies of peft's modules_to_save, keyed as in get_peft_model_state_dict."""
    return _found_once(model, "head", adapter_name, _find_head_parameters)


def _find_head_parameters(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    parameters: dict[str, nn.Parameter] = {}
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for key, parameter in module.modules_to_save[adapter_name].named_parameters():
                parameters[f"{name}.{key}"] = parameter
    return parameters


def read_head(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, Tensor]:
    """A copy of every modules_to_save parameter (empty when the model has none)."""
    return {
        key: parameter.detach().clone()
        for key, parameter in _head_parameters(model, adapter_name).items()
    }


def write_head(
    model: nn.Module, head: Mapping[str, Tensor], adapter_name: str = DEFAULT_ADAPTER
) -> None:
    """Copy the head into the model's modules_to_save; names and shapes must match."""
    parameters = _head_parameters(model, adapter_name)
    _check_head(parameters, head)
    _copy(parameters, head)


def _check_head(parameters: dict[str, nn.Parameter], head: Mapping[str, Tensor]) -> None:
    _check_same_names("head", set(head), set(parameters))
    for key, tensor in head.items():
        if tensor.shape != parameters[key].shape:
            raise ModelMismatchError(
                f"head parameter {key!r}: shape {tuple(tensor.shape)}, the model's is "
                f"{tuple(parameters[key].shape)}"
            )


@torch.no_grad()
def _copy(targets: Mapping[str, Tensor], values: Mapping[str, Tensor]) -> None:
    for key, value in values.items():
        targets[key].copy_(value)


# ---- base weights ---------------------------------------------------------------------------------


def base_weights(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, Tensor]:
    """A copy of the current base weight of every adapted module, in Linear orientation."""
    return {
        name: _to_linear(layer.get_base_layer().weight.detach(), layer.fan_in_fan_out).clone(
            memory_format=torch.contiguous_format
        )
        for name, layer in lora_layers(model, adapter_name).items()
    }


def pretrained_weights(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, Tensor]:
    """The pretrained base weights (Linear orientation), captured on the first call and kept.

    Call it before anything but this module changes the base weights; `apply_client_state` calls it
    before it writes a base. A copy of the model made afterwards carries the same captured weights.
    """
    captured = model.__dict__.get(PRETRAINED_ATTRIBUTE)
    if captured is None:
        captured = base_weights(model, adapter_name)
        model.__dict__[PRETRAINED_ATTRIBUTE] = captured
    return captured


def _check_base_weights(layers: dict[str, LoraLinear], weights: Mapping[str, Tensor]) -> None:
    _check_same_names("base weights", set(weights), set(layers))
    for name, weight in weights.items():
        expected = (layers[name].out_features, layers[name].in_features)
        if tuple(weight.shape) != expected:
            raise ModelMismatchError(
                f"module {name!r}: base weight {tuple(weight.shape)}, the layer's is {expected} "
                "(d_out x d_in)"
            )


@torch.no_grad()
def _copy_base_weights(layers: dict[str, LoraLinear], weights: Mapping[str, Tensor]) -> None:
    for name, weight in weights.items():
        layer = layers[name]
        layer.get_base_layer().weight.copy_(_to_linear(weight, layer.fan_in_fan_out))


# ---- client state ---------------------------------------------------------------------------------


def apply_client_state(
    model: nn.Module,
    state: ClientState,
    pretrained: Mapping[str, Tensor] | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
) -> None:
    """Write the state's adapter, head and base weights (pretrained + base_shift) into the model.

    A module without a base shift gets its pretrained weight back. ``pretrained`` defaults to the
    model's own captured copy (`pretrained_weights`). Everything is checked before anything is
    written, so a mismatch leaves the model as it was.
    """
    if state.cores:
        raise ModelMismatchError("Fed-SB cores need a LoRA-SB module, not a peft LoRA layer")
    pretrained = pretrained_weights(model, adapter_name) if pretrained is None else pretrained
    unknown = sorted(set(state.base_shift) - set(pretrained))
    if unknown:
        raise ModelMismatchError(f"base shift for modules without pretrained weights: {unknown}")
    layers, head = lora_layers(model, adapter_name), _head_parameters(model, adapter_name)
    bases = _shifted(pretrained, state.base_shift)
    _check_adapter(layers, state.adapter, adapter_name)
    _check_head(head, state.head)
    _check_base_weights(layers, bases)
    _copy_adapter(layers, state.adapter, adapter_name)
    _copy(head, state.head)
    _copy_base_weights(layers, bases)
    model.__dict__[SHIFT_ATTRIBUTE] = dict(state.base_shift)


def _shifted(
    pretrained: Mapping[str, Tensor], base_shift: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """pretrained + base_shift per module (a module without a shift keeps its pretrained weight)."""
    weights = {}
    for name, weight in pretrained.items():
        shift = base_shift.get(name)
        if shift is not None and shift.shape != weight.shape:
            raise ModelMismatchError(
                f"module {name!r}: base shift {tuple(shift.shape)}, the weight is "
                f"{tuple(weight.shape)} (d_out x d_in)"
            )
        weights[name] = weight if shift is None else weight + shift.to(weight.device)
    return weights


def client_state_from_model(
    model: nn.Module,
    pretrained: Mapping[str, Tensor] | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
) -> ClientState:
    """The model's adapter, head and base shift (`base_shifts`)."""
    return ClientState(
        adapter=read_adapter(model, adapter_name),
        head=read_head(model, adapter_name),
        base_shift=base_shifts(model, pretrained, adapter_name),
    )


def base_shifts(
    model: nn.Module,
    pretrained: Mapping[str, Tensor] | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
    current: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Base minus pretrained, only where it differs; for a base stored in a half type, the exact
    shift `apply_client_state` last wrote (none before it wrote one). ``current``: the base
    weights as the caller already read them (`base_weights`), not read again."""
    pretrained = pretrained_weights(model, adapter_name) if pretrained is None else pretrained
    current = base_weights(model, adapter_name) if current is None else current
    _check_same_names("pretrained weights", set(pretrained), set(current))
    if any(weight.dtype not in EXACT_DTYPES for weight in current.values()):
        return dict(model.__dict__.get(SHIFT_ATTRIBUTE, {}))
    base_shift = {}
    for name, weight in current.items():
        shift = weight - pretrained[name].to(weight.device)
        if torch.any(shift != 0):
            base_shift[name] = shift
    return base_shift
