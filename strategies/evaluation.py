"""Server-side evaluation and export of the global model.

The server evaluates, on its held-out set, the model a client of each rank class runs
(`fedlora.lora.global_model.rank_class_deltas`): once for the exact methods, whose clients all run W_t,
and per rank for the others; the row's accuracy is the top rank's. Personalized methods (FedSA-LoRA)
have no global model: their accuracy stays the clients' personal one. It evaluates in the rounds
that ``evaluate-every`` names (`fedlora.config.RunConfig.evaluates`); in the rounds that
``generation-every`` names, the top rank's model also answers the held-out instructions
(`fedlora.training.generation_eval`).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from fedlora.config import RunConfig, parse_rank_profile
from fedlora.data.loading import class_names
from fedlora.data.partitioning import server_eval_set
from fedlora.lora.adapter import LoRAFactors, lora_scale
from fedlora.lora.global_model import plain_model_with, rank_class_deltas
from fedlora.models.base_model import load_base_model, quiet_transformers, with_lora
from fedlora.models.peft_io import write_adapter, write_head
from fedlora.rules import AggregationRule, GlobalState
from fedlora.run_records.atomic_files import (
    fresh_directory_beside,
    swap_in_directory,
    write_json_atomic,
)
from fedlora.training.generation_eval import GenerationEvaluation, GenerationReport
from fedlora.training.local import device_for, evaluate

logger = logging.getLogger(__name__)
LABELS_FILE = "labels.json"
"""Beside an exported adapter: ``id2label`` and ``label2id`` when the labels were names."""


class ServerEvaluation:
    """Accuracy and loss of the global model per rank class on the server's held-out set."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.base = load_base_model(config)
        self.data = server_eval_set(config)
        self.device = device_for(config)
        profile = parse_rank_profile(config.rank_profile)
        self.ranks = sorted({rank for rank, _ in profile} or {config.lora_rank})
        self.generation = GenerationEvaluation(config, self.data, self.base.tokenizer)

    def __call__(self, rule: AggregationRule, state: GlobalState, server_round: int) -> dict | None:
        """accuracy, loss and accuracy_by_rank; in a generation round also ``generation``, the
        top rank's `GenerationReport`; in a round that ``evaluate-every`` skips, the same keys
        with null values."""
        if rule.personalized or len(self.data) == 0:
            return None
        ranks = [max(self.ranks)] if rule.exact else self.ranks
        if not self.config.evaluates(server_round):
            by_rank = dict.fromkeys(str(rank) for rank in ranks)
            return {"accuracy": None, "loss": None, "accuracy_by_rank": by_rank, "generation": None}
        by_rank = {}
        generation: GenerationReport | None = None
        for rank in ranks:
            model = self.model_for(rule, state, rank, self.device)
            report = evaluate(model, self.data, self.base.tokenizer, self.config, self.device)
            by_rank[rank] = report
            if rank == max(ranks) and self.generation.due(server_round):
                generation = self.generation(model)
        top = by_rank[max(ranks)]
        return {
            "accuracy": top.accuracy,
            "loss": top.loss,
            "accuracy_by_rank": {str(rank): report.accuracy for rank, report in by_rank.items()},
            "generation": generation,
        }

    def model_for(
        self,
        rule: AggregationRule,
        state: GlobalState,
        rank: int,
        device: torch.device | str = "cpu",
    ):
        """The plain model a client of ``rank`` runs with, on ``device``."""
        config = self.config
        deltas = rank_class_deltas(
            rule, state, rank, config.lora_alpha, config.rslora, device=device
        )
        return plain_model_with(self.base.model, deltas, state.head, device)

    def export(self, rule: AggregationRule, state: GlobalState, directory: Path) -> None:
        """The final global model at the top rank: peft's adapter (``save_pretrained``) where the
        base weights never change, else the merged model; nothing for a personalized method.

        It is written into a fresh directory that then replaces ``directory`` whole, so no file
        of an earlier export stays beside it. The tokenizer goes with it (when the model has one)
        and, when the labels were names, ``id2label``/``label2id``: in the merged model's
        config, and in `LABELS_FILE` beside an adapter (whose config is peft's)."""
        if rule.personalized:
            logger.info("%s is personalized: no global model to export", rule.name)
            return
        fresh = fresh_directory_beside(directory)
        try:
            self._save(rule, state, fresh)
        except BaseException:
            shutil.rmtree(fresh, ignore_errors=True)
            raise
        swap_in_directory(fresh, directory)

    def _save(self, rule: AggregationRule, state: GlobalState, directory: Path) -> None:
        labels = label_maps(class_names(self.config))
        top = max(self.ranks)
        if state.factors and state.changes is None:
            model = with_lora(
                self.base,
                top,
                self.config.lora_alpha,
                self.config.rslora,
                self.config.target_module_names,
                self.config.head_module_names,
            )
            scale = lora_scale(self.config.lora_alpha, top, self.config.rslora)
            write_adapter(
                model,
                {m: LoRAFactors.from_folded(f, top, scale) for m, f in state.factors.items()},
            )
            write_head(model, state.head)
            if labels:
                write_json_atomic(directory / LABELS_FILE, labels)
        else:
            model = self.model_for(rule, state, top)
            if labels:
                model.config.update(labels)
        with quiet_transformers():
            model.save_pretrained(directory)
            if hasattr(self.base.tokenizer, "save_pretrained"):
                self.base.tokenizer.save_pretrained(directory)


def label_maps(names: list[str] | None) -> dict[str, dict]:
    """transformers' ``id2label`` and ``label2id`` for class ``names`` (empty for None)."""
    if names is None:
        return {}
    return {
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
    }
