"""The exported global model, loaded by plain transformers and peft, generates what the server's own
model generates: peft's adapter for FedAvg (the base never changes), the merged model for
FedEx-LoRA (it changes the base)."""

import copy
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from clients.app import client_app
from fedlora.config import RunConfig
from fedlora.data.instructions import prompt_ids, user_turn
from fedlora.data.partitioning import server_eval_set
from fedlora.models.base_model import load_base_model
from fedlora.models.generation import greedy_replies
from strategies.evaluation import ServerEvaluation
from strategies.server_app import run
from tests.support.local_grid import LocalGrid


@pytest.fixture
def instructions_spec(tmp_path):
    colours = ["red", "green", "blue", "black", "white"]
    rows = [
        {"instruction": f"Say {colours[i % 5]}.", "response": colours[i % 5]} for i in range(30)
    ]
    path = tmp_path / "instructions.json"
    path.write_text(json.dumps(rows))
    return f"json:{path}"


@pytest.mark.parametrize("strategy", ["fedavg", "fedex"])
def test_the_export_loads_plainly_and_generates_the_server_s_greedy_text(
    strategy, instructions_spec, tmp_path, task_identity, one_thread
):
    flower_config = {
        "strategy": strategy,
        "model": "tiny-llama",
        "task": "causal-lm",
        "dataset": instructions_spec,
        "partitioner": "iid",
        "num-server-rounds": 1,
        "max-length": 16,
        "batch-size": 4,
        "local-steps": 2,
        "learning-rate": 0.05,
        "server-eval-fraction": 0.2,
    }
    run_dir = tmp_path / "run"
    grid = LocalGrid(client_app(flower_config), num_nodes=2)
    strategy_run = run(grid, {**flower_config, "run-dir": str(run_dir)})
    config = RunConfig.from_flower(flower_config)
    evaluation = ServerEvaluation(config)
    server_model = evaluation.model_for(strategy_run.rule, strategy_run.state, config.lora_rank)

    export = run_dir / "export"
    if strategy == "fedavg":
        assert (export / "adapter_model.safetensors").exists()
        base = copy.deepcopy(load_base_model(config).model)
        loaded = PeftModel.from_pretrained(base, export).eval()
    else:
        assert (export / "model.safetensors").exists()
        loaded = AutoModelForCausalLM.from_pretrained(export).eval()

    tokenizer = evaluation.base.tokenizer
    data = server_eval_set(config)
    prompts = [prompt_ids(tokenizer, user_turn(row["instruction"])) for row in data]
    ours = greedy_replies(server_model, tokenizer, prompts, max_new_tokens=4, batch_size=3)
    theirs = greedy_replies(loaded, tokenizer, prompts, max_new_tokens=4, batch_size=3)
    assert ours == theirs
    batch = torch.tensor([prompts[0]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).logits, server_model(batch).logits)
        moved = server_model(batch).logits - load_base_model(config).model(batch).logits
    assert moved.abs().max() > 1e-3  # the run did change the model
