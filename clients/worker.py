"""What one worker process keeps across messages, per run configuration: the base model (loaded
once, never per message), a few trainable copies by rank pattern, the clients' data (their rows
read from the run's shared splits where the run directory has them, `fedlora.data.shared_splits`,
else partitioned here), and the drifted base (W_v - W_0) that every client of the worker shares,
one per base store."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel
from torch import nn

from fedlora.config import RunConfig
from fedlora.data.partitioning import ClientData, client_data, client_data_from_rows
from fedlora.data.shared_splits import Splits, read_splits
from fedlora.lora.client_state import ClientState
from fedlora.lora.versioning import BaseCache
from fedlora.models.base_model import load_base_model, with_lora, with_sb_layers
from fedlora.models.peft_io import ModelMismatchError, read_adapter, read_head
from fedlora.rules.legend import layer_index
from fedlora.training.local import device_for
from fedlora.training.rendezvous import current_slot
from fedlora.training.speed import prepare_for_training

PEFT_PREFIX = "base_model.model."
MAX_MODELS = 4
"""Trainable copies kept per worker (HetLoRA's pruning makes new rank patterns); oldest go first."""


@dataclass
class LoRAModel:
    """A peft copy of the base and its state as built: seeded A, B = 0, the base's head."""

    model: PeftModel
    pristine: ClientState


class Worker:
    """The models, data and drifted bases of one process for one run configuration."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.device = device_for(config)
        self.base = load_base_model(config)
        self._models: OrderedDict[tuple, LoRAModel | nn.Module] = OrderedDict()
        self._data: dict[tuple[int, int], ClientData] = {}
        self._splits: dict[tuple[Path, int], Splits] = {}
        self._caches: dict[str, BaseCache] = {}
        self._slots = 1

    def lora_model(self, ranks: Mapping[str, int] | int) -> LoRAModel:
        """A LoRA copy with these ranks (one for all modules, or per peft module path; modules
        left out of the dict are not adapted, through peft's ``layers_to_transform``: the
        numbered layers of the modules named, which must then be exactly those). One rank on
        every module that a copy of that rank, already built, adapts is that copy."""
        if not isinstance(ranks, int) and len(set(ranks.values())) == 1:
            uniform = self._held(lora_key(next(iter(ranks.values())), {}, None))
            if uniform is not None and set(uniform.pristine.adapter) == set(ranks):
                return uniform
        top, pattern = rank_pattern(ranks)
        layers = transformed_layers(ranks)
        config = self.config

        def build() -> LoRAModel:
            model = with_lora(
                self.base,
                top,
                config.lora_alpha,
                config.rslora,
                config.target_module_names,
                config.head_module_names,
                rank_pattern=pattern,
                device=self.device,
                seed=config.seed,
                layers_to_transform=layers,
            )
            built = ClientState(adapter=read_adapter(model), head=read_head(model))  # no shift yet
            prepare_for_training(model, config, self.device)
            if not isinstance(ranks, int) and set(built.adapter) != set(ranks):
                raise ModelMismatchError(
                    f"LoRA on layers {layers} adapts modules {sorted(built.adapter)}, not the "
                    f"requested {sorted(ranks)}"
                )
            return LoRAModel(model, built)

        return self._cached(lora_key(top, pattern, layers), build)

    def sb_model(self, capacities: Mapping[str, int] | int) -> nn.Module:
        """A Fed-SB copy at the run's top rank training these capacities (zero factors until the
        server's are loaded)."""
        key = capacities if isinstance(capacities, int) else tuple(sorted(capacities.items()))
        return self._cached(
            ("sb", key),
            lambda: with_sb_layers(
                self.base,
                self.config.max_rank,
                capacities,
                self.config.target_module_names,
                device=self.device,
                modules_to_save=self.config.head_module_names,
            ),
        )

    def data(
        self, partition_id: int, num_partitions: int, run_dir: Path | None = None
    ) -> ClientData:
        """The client's train and test splits: its rows from the shared splits of ``run_dir``
        when it has them, else partitioned here (the same splits)."""
        key = (partition_id, num_partitions)
        if key not in self._data:
            rows = (
                self.shared_splits(run_dir, num_partitions).get(partition_id) if run_dir else None
            )
            self._data[key] = (
                client_data(self.config, partition_id, num_partitions)
                if rows is None
                else client_data_from_rows(self.config, *rows)
            )
        return self._data[key]

    def shared_splits(self, run_dir: Path, num_partitions: int) -> Splits:
        """The run directory's splits for this config, read once (empty without a usable file)."""
        key = (run_dir, num_partitions)
        if key not in self._splits:
            self._splits[key] = read_splits(run_dir, self.config, num_partitions) or {}
        return self._splits[key]

    def store_cache(self, store: str) -> BaseCache:
        """The drifted base this worker shares between its clients, for one base store, on its
        device."""
        return self._caches.setdefault(store, BaseCache(device=self.device))

    def _held(self, key: tuple) -> LoRAModel | nn.Module | None:
        """The copy of ``key`` for this thread's group slot if it is built, else None."""
        return self._models.get(self._slot_key(key))

    def _cached(self, key: tuple, build: Callable[[], LoRAModel | nn.Module]):
        """The copy of ``key`` for this thread's group slot (`fedlora.training.rendezvous`: the
        clients of a group hold their models at once), built on first use; the oldest go first
        past ``MAX_MODELS`` per slot."""
        key = self._slot_key(key)
        if key in self._models:
            self._models.move_to_end(key)
        else:
            self._models[key] = build()
            while len(self._models) > MAX_MODELS * self._slots:
                self._models.popitem(last=False)
        return self._models[key]

    def _slot_key(self, key: tuple) -> tuple:
        """``key`` for this thread's group slot (0 outside a group)."""
        slot = current_slot()
        index = 0 if slot is None else slot.index
        self._slots = max(self._slots, index + 1)
        return (*key, index)


def lora_key(top: int, pattern: Mapping[str, int], layers: list[int] | None) -> tuple:
    """A LoRA copy's key among a worker's copies: its top rank, rank pattern and layers."""
    return ("lora", top, tuple(sorted(pattern.items())), tuple(layers or ()))


def rank_pattern(ranks: Mapping[str, int] | int) -> tuple[int, dict[str, int]]:
    """(top rank, peft rank_pattern for the modules below it); module paths become exact patterns."""
    if isinstance(ranks, int):
        return ranks, {}
    top = max(ranks.values())
    pattern = {
        re.escape(module.removeprefix(PEFT_PREFIX)): rank
        for module, rank in ranks.items()
        if rank != top
    }
    return top, pattern


def transformed_layers(ranks: Mapping[str, int] | int) -> list[int] | None:
    """The numbered layers of the modules in ``ranks`` (peft's ``layers_to_transform``), or None
    (every layer) for one rank, or where a module is in no numbered layer."""
    if isinstance(ranks, int):
        return None
    layers = {layer_index(module) for module in ranks}
    return None if None in layers else sorted(layers)


_WORKERS: dict[RunConfig, Worker] = {}


def worker_for(config: RunConfig) -> Worker:
    """This process's worker for ``config``, made on first use."""
    if config not in _WORKERS:
        _WORKERS[config] = Worker(config)
    return _WORKERS[config]
