"""The LLM recipe, for real: SmolLM2-135M-Instruct instruction-tuned on bbc-topic by 3 clients of
LoRA ranks 4, 8 and 16 under FedEx-LoRA, 2 rounds on the in-process engine (one to two minutes
on 2 cores); its export, loaded by plain transformers with its own tokenizer, answers the held-out
articles as the server's model did."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cli.main import main
from fedlora.data.partitioning import server_eval_set
from fedlora.training.generation_eval import GenerationEvaluation
from simulations.recipe_files import RECIPES_DIR
from simulations.recipes import load_recipe
from simulations.run_dir import read_metrics

pytestmark = pytest.mark.slow


def test_llm_recipe_runs_two_rounds_and_lowers_the_answer_loss(tmp_path):
    recipe = RECIPES_DIR / "llm.toml"
    assert main(["simulate", str(recipe), "--rounds", "2", "--out", str(tmp_path)]) == 0
    rows = read_metrics(tmp_path)
    assert [row["round"] for row in rows] == [1, 2]
    assert all(row["clients"] == 3 for row in rows)
    assert all(row["relative_deviation"] < 1e-3 for row in rows)  # exact up to float32
    assert rows[1]["loss"] < rows[0]["loss"], [row["loss"] for row in rows]
    assert all(0 <= row["answer_accuracy"] <= 1 for row in rows)
    assert all(row["eval_loss"] == row["loss"] for row in rows)
    assert len((tmp_path / "samples" / "round-2.jsonl").read_text().splitlines()) == 11
    assert (tmp_path / "export" / "model.safetensors").exists()
    assert_export_answers_as_the_server(tmp_path)


def assert_export_answers_as_the_server(run_dir):
    """The merged model and tokenizer in ``export/`` give the server's last samples."""
    config = load_recipe(run_dir / "config.toml").run_config
    export = run_dir / "export"
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    report = GenerationEvaluation(config, server_eval_set(config), tokenizer)(model)
    lines = (run_dir / "samples" / f"round-{config.num_server_rounds}.jsonl").read_text()
    server_samples = [json.loads(line) for line in lines.splitlines()]
    assert report.samples == server_samples
