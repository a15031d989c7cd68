"""A worker's LoRA copies: one per rank pattern, whether a client names its rank (the rank query)
or the ranks of every module (a payload); other patterns get copies of their own."""

from clients import worker as worker_module
from clients.worker import Worker
from fedlora.config import RunConfig
from fedlora.models.base_model import with_lora


def test_one_rank_on_every_module_is_the_copy_of_that_rank():
    worker = Worker(RunConfig(model="tiny-bert", max_length=32))
    by_rank = worker.lora_model(4)
    modules = sorted(by_rank.pristine.adapter)

    by_module = worker.lora_model(dict.fromkeys(modules, 4))

    assert by_module is by_rank
    assert worker.lora_model(8) is not by_rank


def test_a_module_subset_or_mixed_ranks_get_copies_of_their_own():
    worker = Worker(RunConfig(model="tiny-bert", max_length=32))
    modules = sorted(worker.lora_model(4).pristine.adapter)
    first_layer = [module for module in modules if ".layer.0." in module]
    mixed = {module: 2 if module in first_layer else 4 for module in modules}

    subset = worker.lora_model(dict.fromkeys(first_layer, 4))
    both = worker.lora_model(mixed)

    assert sorted(subset.pristine.adapter) == first_layer
    assert {module: f.rank for module, f in both.pristine.adapter.items()} == mixed
    assert subset is not worker.lora_model(4) and both is not worker.lora_model(4)


def test_ranks_named_before_any_rank_query_build_one_copy(monkeypatch):
    modules = sorted(
        Worker(RunConfig(model="tiny-bert", max_length=32)).lora_model(4).pristine.adapter
    )
    first_layer = [module for module in modules if ".layer.0." in module]
    worker = Worker(RunConfig(model="tiny-bert", max_length=32))
    built = []
    monkeypatch.setattr(
        worker_module, "with_lora", lambda *a, **k: built.append(1) or with_lora(*a, **k)
    )

    worker.lora_model(dict.fromkeys(first_layer, 4))

    assert len(built) == 1
