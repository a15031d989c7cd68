"""Several clients' LoRA adapters over one shared frozen base, trained in one forward/backward.

A group's batch is the clients' batches stacked along the batch dimension, client g owning the
rows ``rows[g]``. Every adapted linear layer computes the frozen base once for all rows and adds,
on client g's rows only, its own low-rank term: y_g = W x_g + s_g B_g A_g x_g. Rows never mix in
a transformer (no batch statistics), so client g's loss depends on its own factors alone, and the
gradient of the summed losses with respect to (A_g, B_g) is that of client g's loss: each client
trains exactly as it would alone (up to float rounding; dropout masks are drawn for the whole
batch, so they match the lone run's only when dropout is 0).

peft's mixed-batch forward (``adapter_names``) serves inference only (it refuses train mode),
hence this small layer. Factors enter and leave by peft's module paths (``base_model.model.``
prefix), so a client's peft model and its slot in a group exchange them directly.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from fedlora.lora.adapter import lora_scale
from fedlora.lora.client_state import fresh_lora_A
from fedlora.lora.fedsb_init import module_seed
from fedlora.models.peft_io import DEFAULT_ADAPTER, lora_layers, read_head

PEFT_PREFIX = "base_model.model."


def batched(rows: Sequence[int]) -> bool:
    """Whether the grouped layers compute all clients' LoRA terms in batched products: when every
    client owns the same number of rows (else by products per client)."""
    return len(set(rows)) == 1


class GroupedLoRALinear(nn.Module):
    """A frozen linear layer plus one LoRA term per client, each applied to that client's rows.

    The clients' factors are two parameters, A of shape (G, top rank, d_in) and B of shape
    (G, d_out, top rank): client g's are ``A[g, :r_g]`` and ``B[g, :, :r_g]``, the rest zeros. A
    padded row of A meets a zero column of B, so it adds exactly 0, gets a zero gradient, and
    AdamW leaves it zero (zero moments, decay of zero): each client's factors stay its own. The
    factors are float32 over a float32 or lower-precision base (float64 over a float64 one). When
    the clients own equal row counts (`batched`) the terms take two batched products, else
    products per client."""

    def __init__(self, base: nn.Linear, ranks: Sequence[int], scalings: Sequence[float]) -> None:
        super().__init__()
        self.base = base
        self.ranks = list(ranks)
        self.scalings = list(scalings)
        top = max(ranks)
        weight = base.weight
        factory = {
            "device": weight.device,
            "dtype": torch.promote_types(weight.dtype, torch.float32),
        }
        clients = len(ranks)
        self.lora_A = nn.Parameter(torch.zeros(clients, top, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(clients, base.out_features, top, **factory))
        scalings_tensor = torch.tensor(self.scalings, **factory).view(-1, 1, 1)
        self.register_buffer("stacked_scalings", scalings_tensor, persistent=False)
        self.rows: list[int] | None = None

    def client_A(self, client: int) -> Tensor:
        """Client ``client``'s A (r_g x d_in), a view of the stacked parameter."""
        return self.lora_A[client, : self.ranks[client]]

    def client_B(self, client: int) -> Tensor:
        """Client ``client``'s B (d_out x r_g), a view of the stacked parameter."""
        return self.lora_B[client, :, : self.ranks[client]]

    def forward(self, x: Tensor) -> Tensor:
        if self.rows is None:
            raise RuntimeError("GroupedLoRALinear called outside GroupedLoRA.forward (rows unset)")
        result = self.base(x)
        if not torch.is_autocast_enabled(x.device.type):  # autocast casts the products itself
            x = x.to(self.lora_A.dtype)
        term = self.batched_terms(x) if batched(self.rows) else self.client_terms(x)
        return result + term.to(result.dtype)

    def client_terms(self, x: Tensor) -> Tensor:
        """s_g B_g A_g x_g on each client's rows, by products per client."""
        return torch.cat(
            [
                (part @ self.client_A(client).T @ self.client_B(client).T) * scaling
                for client, (part, scaling) in enumerate(
                    zip(x.split(self.rows), self.scalings, strict=True)
                )
            ]
        )

    def batched_terms(self, x: Tensor) -> Tensor:
        """The same terms for equal row counts, by two batched products: x as (G, rows x
        positions, d_in) against s A^T (G, d_in, top rank), then B^T (G, top rank, d_out)."""
        stacked = x.reshape(len(self.ranks), -1, x.shape[-1])
        hidden = torch.bmm(stacked, (self.lora_A * self.stacked_scalings).transpose(1, 2))
        terms = torch.bmm(hidden, self.lora_B.transpose(1, 2))
        return terms.reshape(*x.shape[:-1], -1)


class GroupedHead(nn.Module):
    """One trainable copy per client of a head module (peft's ``modules_to_save``: a classifier,
    a pooler), each applied to its client's rows."""

    def __init__(self, module: nn.Module, num_clients: int) -> None:
        super().__init__()
        dtype = torch.promote_types(next(module.parameters()).dtype, torch.float32)
        self.copies = nn.ModuleList(
            copy.deepcopy(module).to(dtype).requires_grad_(True) for _ in range(num_clients)
        )
        self.rows: list[int] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.rows is None:
            raise RuntimeError("GroupedHead called outside GroupedLoRA.forward (rows unset)")
        return torch.cat(
            [head(part) for head, part in zip(self.copies, x.split(self.rows), strict=True)]
        )


class GroupedLoRA(nn.Module):
    """A base model whose target linear layers carry one LoRA adapter per client of the group,
    and whose ``heads`` (module names, matched as peft matches ``modules_to_save``) one trainable
    copy per client.

    ``forward(rows, **batch)`` runs the stacked batch; client g owns the next ``rows[g]`` rows.
    """

    def __init__(
        self,
        base: nn.Module,
        ranks: Sequence[int],
        scalings: Sequence[float],
        target_modules: Sequence[str],
        heads: Sequence[str] = (),
    ) -> None:
        super().__init__()
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        self.base = base
        self.num_clients = len(ranks)
        self.layers: dict[str, GroupedLoRALinear] = {}
        names = [
            name
            for name, module in base.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules
        ]
        if not names:
            raise ValueError(f"no linear layer of the base is named by {list(target_modules)}")
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name)
            layer = GroupedLoRALinear(getattr(parent, child), ranks, scalings)
            setattr(parent, child, layer)
            self.layers[PEFT_PREFIX + name] = layer
        self.heads: dict[str, GroupedHead] = {}
        head_names = [
            name
            for name, _ in base.named_modules()
            if any(name == head or name.endswith("." + head) for head in heads)
        ]
        for name in head_names:
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name)
            head = GroupedHead(getattr(parent, child), len(ranks))
            setattr(parent, child, head)
            self.heads[PEFT_PREFIX + name] = head

    def forward(self, rows: Sequence[int], **batch: Tensor):
        rows = [int(count) for count in rows]
        if len(rows) != self.num_clients:
            raise ValueError(f"{len(rows)} row counts for a group of {self.num_clients} clients")
        grouped = [*self.layers.values(), *self.heads.values()]
        for module in grouped:
            module.rows = rows
        try:
            return self.base(**batch)
        finally:
            for module in grouped:
                module.rows = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters training moves, in module order: every layer's stacked A (unless
        frozen) and B, and each client's heads."""
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def client_head_parameters(self, client: int) -> dict[str, nn.Parameter]:
        """Client ``client``'s head parameters, keyed as peft's state dict keys them."""
        return {
            f"{name}.{key}": parameter
            for name, head in self.heads.items()
            for key, parameter in head.copies[client].named_parameters()
        }

    @torch.no_grad()
    def load_client_head(self, client: int, head: Mapping[str, Tensor]) -> None:
        """Set client ``client``'s head parameters (peft's keys); every one must be given."""
        parameters = self.client_head_parameters(client)
        if set(head) != set(parameters):
            raise ValueError(
                f"client head does not fit the group: {sorted(head)} for {sorted(parameters)}"
            )
        for key, value in head.items():
            parameters[key].copy_(value)

    @torch.no_grad()
    def load_client(self, client: int, factors: Mapping[str, tuple[Tensor, Tensor]]) -> None:
        """Set client ``client``'s (A, B) per peft module path; every layer must be given."""
        if set(factors) != set(self.layers):
            missing = sorted(set(self.layers) - set(factors))
            extra = sorted(set(factors) - set(self.layers))
            raise ValueError(
                f"client factors do not fit the group: missing {missing}, extra {extra}"
            )
        for name, (A, B) in factors.items():
            layer = self.layers[name]
            A_slot, B_slot = layer.client_A(client), layer.client_B(client)
            if A.shape != A_slot.shape or B.shape != B_slot.shape:
                raise ValueError(
                    f"{name}: factors of shapes {tuple(A.shape)}, {tuple(B.shape)} for a slot of "
                    f"{tuple(A_slot.shape)}, {tuple(B_slot.shape)}"
                )
            A_slot.copy_(A)
            B_slot.copy_(B)

    def client_factors(self, client: int) -> dict[str, tuple[Tensor, Tensor]]:
        """Client ``client``'s (A, B) per peft module path (detached, on the group's device)."""
        return {
            name: (layer.client_A(client).detach(), layer.client_B(client).detach())
            for name, layer in self.layers.items()
        }


def peft_factors(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """A peft model's (A, B) per module path."""
    return {
        name: (
            layer.lora_A[DEFAULT_ADAPTER].weight.detach(),
            layer.lora_B[DEFAULT_ADAPTER].weight.detach(),
        )
        for name, layer in lora_layers(model).items()
    }


def peft_scaling(model: nn.Module) -> float:
    """The one scale s = alpha / r (or alpha / sqrt(r)) of a peft model's LoRA layers."""
    scalings = {float(layer.scaling[DEFAULT_ADAPTER]) for layer in lora_layers(model).values()}
    if len(scalings) != 1:
        raise ValueError(
            f"a grouped client needs one LoRA scale for all its layers, not {scalings}"
        )
    return scalings.pop()


def group_of_peft_models(base: nn.Module, models: Sequence[nn.Module]) -> GroupedLoRA:
    """A group over ``base`` (modified in place: pass a copy to keep it) holding each peft model's
    current factors and head; each model must have one rank and one scale over its layers."""
    factors = [peft_factors(model) for model in models]
    ranks = []
    for client in factors:
        client_ranks = {A.shape[0] for A, _ in client.values()}
        if len(client_ranks) != 1:
            raise ValueError(
                f"a grouped client needs one rank for all its layers, not {client_ranks}"
            )
        ranks.append(client_ranks.pop())
    targets = sorted({name.rsplit(".", 1)[-1] for name in factors[0]})
    heads = models[0].peft_config[DEFAULT_ADAPTER].modules_to_save or ()
    group = GroupedLoRA(base, ranks, [peft_scaling(model) for model in models], targets, heads)
    for client, (model, client_factors) in enumerate(zip(models, factors, strict=True)):
        group.load_client(client, client_factors)
        group.load_client_head(client, read_head(model))
    return group


@torch.no_grad()
def fresh_group(
    base: nn.Module,
    ranks: Sequence[int],
    alpha: float,
    rslora: bool,
    target_modules: Sequence[str],
    seed: int,
    heads: Sequence[str] = (),
) -> GroupedLoRA:
    """A group over ``base`` (modified in place) whose clients start as `fedlora.models.base_model.with_lora`
    starts them: A seeded from (``seed``, module path), B = 0, scale alpha / r (or / sqrt(r)),
    each head a copy of the base's."""
    group = GroupedLoRA(
        base, ranks, [lora_scale(alpha, rank, rslora) for rank in ranks], target_modules, heads
    )
    for name, layer in group.layers.items():
        for client, rank in enumerate(ranks):
            A = layer.client_A(client)
            A.copy_(fresh_lora_A(rank, A.shape[1], module_seed(seed, name), dtype=A.dtype))
    return group
