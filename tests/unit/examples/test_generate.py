"""examples/generate.py on the embedded tiny Llama, no training run: a full model directory and a
PEFT adapter over it, built here in seconds; expected outputs from independent computations.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from nemo_rl.config.schema import LoRAConfig
from nemo_rl.models.lora import apply_lora, peft_target_modules, save_peft_adapter

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "examples" / "generate.py"
TINY_MODEL = REPO / "assets" / "tiny-llama"
RANK, ALPHA = 4, 8
TARGETS = ["q_proj", "v_proj", "down_proj"]
SYSTEM = "Ada Lovelace was born in London."
QUESTION = "Where was Ada born?"


def _import_generate():
    """examples/ is not a package: load the script as a module, as `uv run` would run it."""
    spec = importlib.util.spec_from_file_location("generate_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _import_generate()


def _load(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """{"full": a copy of the tiny model + tokenizer, "adapter": a PEFT LoRA over it whose B is
    random (so it changes the outputs) + the tokenizer}."""
    root = tmp_path_factory.mktemp("generate")
    full, adapter = root / "full", root / "adapter"
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    _load(TINY_MODEL).save_pretrained(full)
    tokenizer.save_pretrained(full)

    peft_model = get_peft_model(
        _load(full), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, task_type="CAUSAL_LM")
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    return {"full": full, "adapter": adapter}


def _input_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1978, (2, 10), generator=torch.Generator().manual_seed(seed))


def _merged_by_hand(full: Path, adapter: Path) -> torch.nn.Module:
    """The base with W + (alpha / r) * B @ A written into each adapted weight, from the files."""
    model = _load(full)
    tensors = load_file(adapter / "adapter_model.safetensors")
    params = dict(model.named_parameters())
    merged = 0
    with torch.no_grad():
        for key, A_RI in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            B_OR = tensors[key.replace(".lora_A.", ".lora_B.")]
            params[f"{module}.weight"] += (ALPHA / RANK) * (B_OR @ A_RI)
            merged += 1
    assert merged == 3 * model.config.num_hidden_layers
    return model


# ---------------------------------------------------------------- load_model


def test_adapter_dir_loads_as_peft_model_over_its_recorded_base(dirs):
    model, tokenizer, description = gen.load_model(str(dirs["adapter"]))
    assert isinstance(model, PeftModel) and not model.training
    assert str(dirs["full"]) in description and tokenizer.chat_template
    input_ids = _input_ids()
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        expected = _merged_by_hand(dirs["full"], dirs["adapter"])(input_ids=input_ids).logits
        base = _load(dirs["full"])(input_ids=input_ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert (logits - base).abs().max() > 1e-2  # the adapter does change the outputs


def test_full_dir_loads_as_plain_model(dirs):
    model, _, description = gen.load_model(str(dirs["full"]))
    assert not isinstance(model, PeftModel) and description == f"model {dirs['full']}"
    input_ids = _input_ids(1)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, _load(TINY_MODEL)(input_ids=input_ids).logits)


def test_base_model_flag_overrides_the_recorded_base(dirs, tmp_path):
    config = json.loads((dirs["adapter"] / "adapter_config.json").read_text())
    moved = tmp_path / "adapter"
    moved.mkdir()
    for file in dirs["adapter"].iterdir():
        (moved / file.name).write_bytes(file.read_bytes())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/nowhere"}))
    model, _, description = gen.load_model(str(moved), base_model=str(dirs["full"]))
    assert isinstance(model, PeftModel) and f"over {dirs['full']}" in description


def test_adapter_written_by_our_lora_export_loads(dirs, tmp_path):
    """The format a LoRA run writes to step_<N>/hf/ (save_peft_adapter), not only PEFT's own."""
    cfg = LoRAConfig(enabled=True, dim=RANK, alpha=ALPHA)
    model = _load(dirs["full"])
    targets = apply_lora(model, cfg)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B.weight"):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    save_peft_adapter(
        model.state_dict(), tmp_path, cfg, base_model=str(dirs["full"]),
        target_modules=peft_target_modules(model, targets),
    )
    AutoTokenizer.from_pretrained(dirs["full"]).save_pretrained(tmp_path)
    loaded, _, _ = gen.load_model(str(tmp_path))
    input_ids = _input_ids(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits, rtol=1e-4, atol=1e-4)


def test_missing_checkpoint_dir_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        gen.load_model(str(tmp_path / "missing"))


# ---------------------------------------------------------------- generate


def test_greedy_generation_equals_model_generate_on_the_chat_template_ids(dirs):
    model, tokenizer, _ = gen.load_model(str(dirs["full"]))
    # (the untrained tiny model ends at once after a long system turn; a bare question it continues)
    messages = [{"role": "user", "content": QUESTION}]
    [output] = gen.generate(model, tokenizer, [messages], max_new_tokens=12)

    reference = _load(dirs["full"])
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert prompt_ids[0] == tokenizer.bos_token_id  # the template renders BOS; none is added twice
    assert gen.encode_prompt(tokenizer, messages) == prompt_ids
    input_ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        generated = reference.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                       max_new_tokens=12, do_sample=False)
    expected = tokenizer.decode(generated[0, input_ids.shape[1]:], skip_special_tokens=True).strip()
    assert output == expected and output


def test_adapter_changes_the_greedy_completion(dirs):
    messages = [{"role": "user", "content": QUESTION}]
    outputs = {}
    for kind in ("full", "adapter"):
        model, tokenizer, _ = gen.load_model(str(dirs[kind]))
        [outputs[kind]] = gen.generate(model, tokenizer, [messages], max_new_tokens=12)
    assert outputs["full"] != outputs["adapter"]


def test_sampling_is_seeded(dirs):
    model, tokenizer, _ = gen.load_model(str(dirs["full"]))
    messages = [{"role": "user", "content": QUESTION}]
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(gen.generate(model, tokenizer, [messages], max_new_tokens=12, temperature=1.0))
    assert runs[0] == runs[1]


# ---------------------------------------------------------------- read_conversations


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prompts_file_rows_become_conversations(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [
        json.dumps({"messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": "London"},  # the reference answer: dropped
        ]}),
        "",
        json.dumps({"prompt": QUESTION, "system": SYSTEM}),
        json.dumps({"prompt": "Who was Ada?"}),
    ])
    conversations = gen.read_conversations(["Hello?"], str(path), system=None)
    assert conversations == [
        [{"role": "user", "content": "Hello?"}],
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
        [{"role": "user", "content": "Who was Ada?"}],
    ]


def test_system_flag_fills_only_conversations_without_one(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [
        json.dumps({"prompt": QUESTION, "system": "own context"}),
        json.dumps({"prompt": QUESTION}),
    ])
    conversations = gen.read_conversations([], str(path), system=SYSTEM)
    assert [c[0]["content"] for c in conversations] == ["own context", SYSTEM]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "ok"', "line 2: not JSON"),
        ('{"question": "x"}', "line 2: expected a 'messages' or 'prompt' key; got ['question']"),
        ('["x"]', "line 2: expected a 'messages' or 'prompt' key; got list"),
        ('{"messages": "x"}', "line 2: 'messages' must be a list of"),
        ('{"messages": [{"role": "assistant", "content": "x"}]}', "line 2: 'messages' has no turn before"),
    ],
)
def test_bad_prompts_file_line_names_the_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "prompts.jsonl", [json.dumps({"prompt": "fine"}), line])
    with pytest.raises(ValueError) as info:
        gen.read_conversations([], str(path), system=None)
    assert str(info.value).startswith(f"{path} {message}")


# ---------------------------------------------------------------- main and the script


def test_main_writes_one_output_row_per_prompt(dirs, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [json.dumps({"prompt": QUESTION, "system": SYSTEM})])
    output = tmp_path / "out" / "completions.jsonl"
    rc = gen.main([
        "--checkpoint", str(dirs["adapter"]), "--prompt", "Who was Ada?", "--prompts-file", str(prompts),
        "--max-new-tokens", "8", "--device", "cpu", "--output", str(output),
    ])
    assert rc == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["messages"] for row in rows] == gen.read_conversations(["Who was Ada?"], str(prompts), None)
    model, tokenizer, _ = gen.load_model(str(dirs["adapter"]))
    assert [row["output"] for row in rows] == gen.generate(model, tokenizer, [r["messages"] for r in rows], max_new_tokens=8)
    printed = capsys.readouterr().out
    assert f"# LoRA adapter {dirs['adapter']} over {dirs['full']} on cpu" in printed
    assert all(f"[{i}] assistant: {row['output']}" in printed for i, row in enumerate(rows, 1))


def _run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a new Python process importing torch and transformers; main() is tested in-process above
def test_script_prints_the_completion(dirs):
    result = _run_script("--checkpoint", str(dirs["full"]), "--prompt", QUESTION, "--max-new-tokens", "8", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    model, tokenizer, _ = gen.load_model(str(dirs["full"]))
    [expected] = gen.generate(model, tokenizer, [[{"role": "user", "content": QUESTION}]], max_new_tokens=8)
    assert expected and f"[1] user: {QUESTION}\n[1] assistant: {expected}\n" in result.stdout


@pytest.mark.slow  # a new Python process importing torch and transformers
def test_script_with_missing_checkpoint_exits_nonzero_with_one_line(tmp_path):
    missing = tmp_path / "results" / "step_150" / "hf"
    result = _run_script("--checkpoint", str(missing), "--prompt", QUESTION)
    assert result.returncode == 1
    assert f"error: --checkpoint {missing}: no such directory" in result.stderr
    assert "Traceback" not in result.stderr
