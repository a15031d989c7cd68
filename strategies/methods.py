"""One strategy per method: each binds its `fedlora` rule (setting ``rule_class`` makes the class
that rule's strategy, `strategies.strategy_class`); its options pass through to the rule and the
rest to `LoRAStrategy`. Fed-SB's, which runs its own start, is in `strategies.fedsb`."""

from __future__ import annotations

from fedlora import rules
from strategies.base import LoRAStrategy


class LoRAFedAvg(LoRAStrategy):
    """FedAvg of LoRA factors (FedIT): A and B averaged separately, zero-padded. Not exact."""

    rule_class = rules.FedAvg


class FedExLoRA(LoRAStrategy):
    """FedEx-LoRA: FedAvg's factors plus the exact residual folded into the clients' bases."""

    rule_class = rules.FedExLoRA


class FLoRA(LoRAStrategy):
    """FLoRA: stacked factors merged into the base, a fresh adapter each round. Option:
    ``seed`` of the fresh adapters' A (default 0)."""

    rule_class = rules.FLoRA


class FedSALoRA(LoRAStrategy):
    """FedSA-LoRA: only A is shared; B and the head stay on the clients (personal models)."""

    rule_class = rules.FedSALoRA


class LoRAFAIR(LoRAStrategy):
    """LoRA-FAIR: FedAvg, then a server-side correction of B towards the ideal direction.
    Options: ``steps``, ``lam``, ``lr`` (see `fedlora.rules.lorafair.LoRAFAIR`)."""

    rule_class = rules.LoRAFAIR


class FlexLoRA(LoRAStrategy):
    """FlexLoRA: truncated SVD of the averaged products, best rank-r_i factors per client.
    Options: ``oversample``, ``iterations``, ``seed`` (see `fedlora.rules.flexlora.FlexLoRA`)."""

    rule_class = rules.FlexLoRA


class FFALoRA(LoRAStrategy):
    """FFA-LoRA: A frozen from the run seed, only B trains and travels; exact at any mix of
    ranks (the tail of B past a client's rank goes into its base). Options: ``seed``,
    ``server_optimizer``."""

    rule_class = rules.FFALoRA


class FSLoRA(LoRAStrategy):
    """FSLoRA: each client trains a seeded sketch of the global LoRA's rank components; the
    mapped-back changes go through a server optimizer. Options: ``seed``, ``server_optimizer``."""

    rule_class = rules.FSLoRA


class HetLoRA(LoRAStrategy):
    """HetLoRA: sparsity-weighted padded factors; clients prune their own ranks."""

    rule_class = rules.HetLoRA


class LEGEND(LoRAStrategy):
    """LEGEND: each node adapts its top layers (its LoRA depth) at ranks growing towards the
    output, from its capacity class; each module is averaged over the nodes that adapted it."""

    rule_class = rules.LEGEND
