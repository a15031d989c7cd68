"""The one-GPU LLM recipe resolves to the run it describes (it is not run here)."""

from simulations.recipe_files import RECIPES_DIR
from simulations.recipes import load_recipe, resolve

BBC_ARTICLES = 2225


def test_llm_gpu_recipe_is_smollm2_on_bbc_topic_with_ten_mixed_rank_clients_in_one_process():
    recipe = resolve(load_recipe(RECIPES_DIR / "llm-gpu.toml"))
    config = recipe.run_config
    assert (config.model, config.dataset, config.strategy) == ("smollm2", "bbc-topic", "fedex")
    assert recipe.simulation.num_supernodes == 10
    assert recipe.simulation.engine == "in-process"
    assert config.rank_profile == "4:0.3,8:0.4,16:0.3"
    assert config.min_train_nodes == 5 and config.fraction_train == 0.5
    assert config.num_server_rounds * config.local_steps * config.min_train_nodes == 250
    assert (config.generation_every, config.max_new_tokens) == (5, 5)
    assert config.client_generation
    assert 190 <= round(config.server_eval_fraction * BBC_ARTICLES) <= 210
    assert config.device == "cuda"
