"""The hf generation backend in-process: batching, sampling keys, stops, LoRA, log-likelihoods."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from nemo_rl.config.eval_schema import GenerationConfig
from nemo_rl.config.schema import TokenizerConfig
from nemo_rl.models.generation import cut_at_stop
from nemo_rl.models.generation.hf_worker import HfGenerationWorker

TINY_MODEL = Path(__file__).resolve().parents[4] / "assets" / "tiny-llama"


def _prompts(count: int = 6) -> list[list[int]]:
    """Prompts of different lengths (so a batch is left-padded), BOS first, no pad token."""
    generator = torch.Generator().manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    lengths = [3, 11, 7, 1, 15, 5][:count]
    return [[tokenizer.bos_token_id] + torch.randint(10, 1900, (n,), generator=generator).tolist() for n in lengths]


def _worker(model_name=TINY_MODEL, **generation) -> HfGenerationWorker:
    cfg = GenerationConfig(model_name=str(model_name), **{"max_new_tokens": 12, **generation})
    return HfGenerationWorker(cfg, TokenizerConfig(name=str(model_name)))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """{"adapter": a PEFT LoRA over the tiny model with random B, "merged": the same merged}."""
    root = tmp_path_factory.mktemp("lora")
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(root / "adapter")
    peft_model.peft_config["default"].base_model_name_or_path = str(TINY_MODEL)
    tokenizer.save_pretrained(root / "adapter")
    peft_model.merge_and_unload().save_pretrained(root / "merged")
    tokenizer.save_pretrained(root / "merged")
    return {"adapter": root / "adapter", "merged": root / "merged"}


def test_batched_greedy_equals_one_prompt_at_a_time():
    worker = _worker(batch_size=4)
    prompts = _prompts()
    batched = worker.generate(prompts)
    alone = [worker.generate([prompt])[0] for prompt in prompts]
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
    assert any(len(o.token_ids) > 1 for o in batched)


def test_greedy_equals_model_generate_without_padding():
    """An independent path: transformers' generate on each unpadded prompt."""
    worker = _worker(batch_size=6)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32).eval()
    for prompt, output in zip(_prompts(), worker.generate(_prompts()), strict=True):
        ids = torch.tensor([prompt])
        expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                  eos_token_id=worker.stop_ids, pad_token_id=worker.pad_id)[0, len(prompt):].tolist()
        end = next((i + 1 for i, t in enumerate(expected) if t in worker.stop_ids), len(expected))
        assert output.token_ids == expected[:end]


def test_lora_adapter_generates_as_the_merged_model(dirs):
    prompts = _prompts()
    adapter = _worker(dirs["adapter"])
    merged = _worker(dirs["merged"])
    base = _worker()
    assert "LoRA adapter" in adapter.describe()
    assert [o.token_ids for o in adapter.generate(prompts)] == [o.token_ids for o in merged.generate(prompts)]
    pairs = [(p, [5, 6, 7]) for p in prompts]
    assert adapter.loglikelihood(pairs) == pytest.approx(merged.loglikelihood(pairs), abs=1e-4)
    assert adapter.loglikelihood(pairs) != pytest.approx(base.loglikelihood(pairs), abs=1e-2)  # the adapter matters


def test_loglikelihood_equals_a_forward_of_each_pair_alone():
    worker = _worker(batch_size=3)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32).eval()
    pairs = [(p, [7 + i, 300, 42][: 1 + i % 3]) for i, p in enumerate(_prompts())]
    expected = []
    with torch.no_grad():
        for context, continuation in pairs:
            logprobs_TV = torch.log_softmax(model(input_ids=torch.tensor([context + continuation])).logits[0], -1)
            expected.append(sum(float(logprobs_TV[len(context) - 1 + i, t]) for i, t in enumerate(continuation)))
    assert worker.loglikelihood(pairs) == pytest.approx(expected, abs=1e-4)


def test_stop_token_ids_end_the_generation():
    prompts = _prompts(2)
    free = _worker().generate(prompts)
    stop = free[0].token_ids[2]
    stopped = _worker(stop_token_ids=[stop]).generate(prompts)
    assert stopped[0].token_ids == free[0].token_ids[: free[0].token_ids.index(stop) + 1]
    assert stopped[0].finish_reason == "stop"


def test_stop_strings_cut_the_text_before_the_stop():
    assert cut_at_stop("abc</a>def<b>", ["<b>", "</a>"]) == ("abc", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)
    assert cut_at_stop("abc", None) == ("abc", False)
    free = _worker(max_new_tokens=8).generate(_prompts(1))[0].text
    assert len(free) > 2
    stop = free[1:3]
    text = _worker(max_new_tokens=8, stop_strings=[stop]).generate(_prompts(1))[0].text
    assert text == free[: free.index(stop)]


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    prompts = _prompts()
    greedy = _worker().generate(prompts)
    top1 = _worker(temperature=1.0, top_k=1, seed=3).generate(prompts)
    assert [o.token_ids for o in top1] == [o.token_ids for o in greedy]
    first = _worker(temperature=1.5, seed=3).generate(prompts)
    again = _worker(temperature=1.5, seed=3).generate(prompts)
    other = _worker(temperature=1.5, seed=4).generate(prompts)
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    assert [o.token_ids for o in first] != [o.token_ids for o in other]


def test_max_new_tokens_bounds_the_output():
    for output in _worker(max_new_tokens=3, temperature=1.0, seed=1).generate(_prompts()):
        assert len(output.token_ids) <= 3
        assert output.finish_reason in ("stop", "length")
