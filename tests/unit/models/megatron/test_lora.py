"""LoRA on the Megatron backend (nemo_rl/models/megatron/lora.py).

Fast: which linears are targeted, what adapter_config.json names, and each refused key.
Slow (gloo processes, MegatronPolicyWorker on a tiny Llama): a few LoRA training steps at TP 1,
TP 2 and PP 2, compared with
  - a plain single-process PyTorch training of the HF model with the same adapter structure
    (one lora_A shared by q/k/v and by gate/up, a lora_B per HF projection), started from the
    adapter the worker exported before its first step: same losses and gradient norms (1e-5);
  - `peft.PeftModel.from_pretrained` on the HF base with the exported hf/: the same logits as
    the Megatron model (1e-5), which differ from the base's;
  - the base weights, unchanged; the merged export, the same logits as the adapter;
  - a resumed run (adapters + optimizer from dist_checkpointing): the same step, bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from tests.unit.distributed_helpers import run_ranks
from tests.unit.models.policy.policy_test_utils import EXPECTED_LRS, MAX_GRAD_NORM, make_batch, reference_loss, save_tiny_llama

from nemo_rl.config.megatron_schema import MegatronConfig, MegatronPeftConfig
from nemo_rl.models.megatron.lora import peft_target_modules, select_targets

NUM_STEPS = 3
WEIGHT_DECAY = 0.01
LORA = {"enabled": True, "dim": 4, "alpha": 8}


# ---------------------------------------------------------------- fast: targets and keys


def test_default_targets_are_the_four_linears_of_every_layer():
    targets = select_targets(MegatronPeftConfig(enabled=True), num_layers=2)
    assert targets == [
        f"decoder.layers.{layer}.{path}"
        for layer in (0, 1)
        for path in ("self_attention.linear_qkv", "mlp.linear_fc1", "self_attention.linear_proj", "mlp.linear_fc2")
    ]
    assert peft_target_modules(targets, 2) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_targets_by_megatron_name_wildcard_hf_name_and_exclusion():
    by_wildcard = select_targets(MegatronPeftConfig(enabled=True, target_modules=["*.layers.1.*.linear_qkv"]), num_layers=2)
    assert by_wildcard == ["decoder.layers.1.self_attention.linear_qkv"]
    assert peft_target_modules(by_wildcard, 2) == [f"model.layers.1.self_attn.{p}_proj" for p in ("k", "q", "v")]
    by_hf = select_targets(MegatronPeftConfig(enabled=True, target_modules=["gate_proj", "up_proj", "o_proj"]), num_layers=1)
    assert by_hf == ["decoder.layers.0.mlp.linear_fc1", "decoder.layers.0.self_attention.linear_proj"]
    excluded = select_targets(MegatronPeftConfig(enabled=True, exclude_modules=["linear_fc1", "linear_fc2"]), num_layers=1)
    assert excluded == ["decoder.layers.0.self_attention.linear_qkv", "decoder.layers.0.self_attention.linear_proj"]


@pytest.mark.parametrize(
    ("peft", "message"),
    [
        ({"target_modules": ["q_proj"]}, r"peft.target_modules: \['q_proj'\] without \['k_proj', 'v_proj'\]"),
        ({"target_modules": ["linear_nope"]}, r"peft.target_modules: 'linear_nope' matches no adaptable linear"),
        ({"exclude_modules": ["linear_*"]}, r"peft.exclude_modules=\['linear_\*'\] leaves no linear"),
    ],
)
def test_target_patterns_that_cannot_be_served_are_refused(peft, message):
    with pytest.raises(ValueError, match=message):
        select_targets(MegatronPeftConfig(enabled=True, **peft), num_layers=2)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"peft": {**LORA, "lora_B_init_method": "normal"}}, "peft.lora_B_init_method"),
        ({"peft": {**LORA, "lora_A_init_method": "kaiming"}}, "peft.lora_A_init_method"),
        ({"peft": {**LORA, "a2a_experimental": True}}, "peft.a2a_experimental"),
        ({"peft": {**LORA, "lora_dtype": "bfloat16"}}, "peft.lora_dtype"),
        ({"peft": {**LORA, "target_modules": ["linear_qkv"], "exclude_modules": ["linear_fc1"]}}, "peft.target_modules"),
        ({"peft": {**LORA, "dropout": 0.1}, "tensor_model_parallel_size": 2}, "peft.dropout"),
        ({"peft": LORA, "tensor_model_parallel_size": 2, "sequence_parallel": True}, "peft.enabled"),
    ],
)
def test_peft_values_this_build_cannot_serve_are_refused_by_key(overrides, key):
    with pytest.raises(ValidationError, match=rf"policy.megatron_cfg.{key}: "):
        MegatronConfig(enabled=True, **overrides)


def test_peft_values_it_serves_are_accepted():
    cfg = MegatronConfig(enabled=True, peft={**LORA, "dropout": 0.1, "dropout_position": "post", "lora_A_init_method": "uniform"})
    assert cfg.peft.enabled and cfg.peft.dim == 4


# ---------------------------------------------------------------- slow: training and export


def _lora_policy_config(model_dir: str, *, tp: int = 1, pp: int = 1, **peft):
    from tests.unit.models.policy.test_megatron_policy_worker import megatron_policy_config

    return megatron_policy_config(model_dir, tp=tp, pp=pp, peft={**LORA, **peft})


def _train_lora(rank, model_dir, out_dir, tp, pp):
    """hf0/ (the initial adapter), NUM_STEPS steps with a checkpoint before the last one, hf/
    and hf_merged/; the Megatron logits and base weights."""
    from tests.unit.models.megatron.megatron_test_utils import _forward_logits, sample_input_ids
    from tests.unit.models.policy.test_megatron_policy_worker import _allow_child_processes

    from nemo_rl.algorithms.loss_functions import NLLLoss
    from nemo_rl.models.megatron import hf_conversion
    from nemo_rl.models.policy.micro_batching import MicroBatchPlan
    from nemo_rl.models.policy.workers.megatron_policy_worker import MegatronPolicyWorker

    _allow_child_processes()
    config = _lora_policy_config(model_dir, tp=tp, pp=pp)
    worker = MegatronPolicyWorker(config, seed=1, device="cpu")
    dp_size = torch.distributed.get_world_size() // (tp * pp)
    result = {"counts": worker.get_parameter_counts(), "history": [], "gathered_shapes": []}
    gather = hf_conversion.gather_tensor_parallel_shards

    def recording_gather(shard):  # what the adapter export sends over the tensor-parallel group
        result["gathered_shapes"].append(tuple(shard.shape))
        return gather(shard)

    hf_conversion.gather_tensor_parallel_shards = recording_gather
    try:
        worker.save_checkpoint(weights_path=None, hf_path=f"{out_dir}/hf0")
    finally:
        hf_conversion.gather_tensor_parallel_shards = gather

    def step(seed, w):
        local = make_batch(seed).shard_by_batch_size(dp_size)[w.data_parallel_rank()]
        return w.train(local, NLLLoss(), MicroBatchPlan(2))

    for seed in range(NUM_STEPS):
        if seed == NUM_STEPS - 1:
            worker.save_checkpoint(weights_path=f"{out_dir}/weights", optimizer_path=f"{out_dir}/optimizer")
        result["history"].append(step(seed, worker))
    worker.save_checkpoint(weights_path=None, hf_path=f"{out_dir}/hf", hf_merged_path=f"{out_dir}/hf_merged")
    (chunk,) = worker.bare_chunks
    chunk.eval()
    with torch.no_grad():
        result["logits"] = _forward_logits(chunk, sample_input_ids(128), 128)
    result["base_state"] = hf_conversion.megatron_to_hf_state_dict(worker.bare_chunks, worker.hf_config)
    worker.shutdown()
    return result


def _resume_last_step(rank, model_dir, out_dir, tp, pp):
    """The last step of `_train_lora` again, from its checkpoint (adapters + optimizer)."""
    from nemo_rl.algorithms.loss_functions import NLLLoss
    from nemo_rl.models.policy.micro_batching import MicroBatchPlan
    from nemo_rl.models.policy.workers.megatron_policy_worker import MegatronPolicyWorker

    config = _lora_policy_config(model_dir, tp=tp, pp=pp)
    worker = MegatronPolicyWorker(config, seed=1, device="cpu", weights_path=f"{out_dir}/weights", optimizer_path=f"{out_dir}/optimizer")
    dp_size = torch.distributed.get_world_size() // (tp * pp)
    local = make_batch(NUM_STEPS - 1).shard_by_batch_size(dp_size)[worker.data_parallel_rank()]
    result = worker.train(local, NLLLoss(), MicroBatchPlan(2))
    worker.shutdown()
    return result


def _reference_training(model_dir: str, initial_adapter: dict[str, torch.Tensor], scale: float) -> list[dict]:
    """Plain PyTorch: the frozen HF model plus, per layer, one A shared by q/k/v and one by
    gate/up (each projection its own B), one A and B on o_proj and on down_proj; AdamW with
    Megatron's weight decay on these matrices, clipping, the same learning rates."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    params: list[torch.nn.Parameter] = []

    def new_param(key: str) -> torch.nn.Parameter:
        params.append(torch.nn.Parameter(initial_adapter[f"base_model.model.{key}"].clone()))
        return params[-1]

    def add_lora(linear, A, B):
        linear.register_forward_hook(lambda module, args, out: out + scale * F.linear(F.linear(args[0], A), B))

    for index, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{index}"
        for group, names in (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")), ("self_attn", ("o_proj",)), ("mlp", ("down_proj",))):
            A = new_param(f"{prefix}.{group}.{names[0]}.lora_A.weight")  # shared by the group
            for name in names:
                assert torch.equal(initial_adapter[f"base_model.model.{prefix}.{group}.{name}.lora_A.weight"], A.data)
                add_lora(getattr(getattr(layer, group), name), A, new_param(f"{prefix}.{group}.{name}.lora_B.weight"))
    optimizer = torch.optim.AdamW(params, lr=EXPECTED_LRS[0], weight_decay=WEIGHT_DECAY)
    history = []
    for seed, lr in zip(range(NUM_STEPS), EXPECTED_LRS, strict=True):
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = reference_loss(model, make_batch(seed))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad()
        history.append({"loss": loss.item(), "grad_norm": grad_norm.item()})
    return history


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama")))


@pytest.mark.slow
@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_lora_training_matches_plain_pytorch_and_exports_a_peft_adapter(model_dir, tmp_path, tp, pp):
    pytest.importorskip("megatron.core")
    from peft import PeftModel
    from safetensors.torch import load_file
    from tests.unit.models.megatron.megatron_test_utils import sample_input_ids
    from transformers import AutoModelForCausalLM

    out = str(tmp_path)
    results = run_ranks(tp * pp, _train_lora, model_dir, out, tp, pp, timeout_s=600)
    holder = next(r for r in results if r["logits"] is not None)  # last stage, TP rank 0

    # Training: the same losses and gradient norms as the plain-PyTorch adapter, every rank.
    reference = _reference_training(model_dir, load_file(f"{out}/hf0/adapter_model.safetensors"), scale=LORA["alpha"] / LORA["dim"])
    for result in results:
        for got, want in zip(result["history"], reference, strict=True):
            assert got["update_skipped"] is False
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    # 2 layers x (qkv: A [4, 32], B [32 + 16 + 16, 4]; fc1: A [4, 32], B [2 x 64, 4]; proj: A [4, 32], B [32, 4]; fc2: A [4, 64], B [32, 4])
    assert results[0]["counts"]["trainable"] == 2 * (4 * 32 + 64 * 4 + 4 * 32 + 128 * 4 + 4 * 32 + 32 * 4 + 4 * 64 + 32 * 4)
    assert results[0]["counts"]["lora_modules"] == 8

    if tp == 2:
        # Only each adapter's split factor was gathered: lora_B of the column-parallel linears
        # (qkv [64, 4], fc1 [128, 4]), lora_A of the row-parallel ones (proj [4, 32], fc2 [4, 64]).
        for result in results:
            assert sorted(result["gathered_shapes"]) == sorted(2 * [(32, 4), (64, 4), (4, 16), (4, 32)])

    # The base weights did not move.
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    exported_base = next(r["base_state"] for r in results if r["base_state"])
    for name, tensor in base.state_dict().items():
        if name != "lm_head.weight":  # tied
            assert torch.equal(exported_base[name], tensor), name

    # hf/ is a PEFT adapter directory whose logits are the Megatron model's.
    config = json.loads(open(f"{out}/hf/adapter_config.json").read())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8, "LORA")
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    input_ids = sample_input_ids(128)
    with torch.no_grad():
        base_logits = base(input_ids=input_ids).logits
        peft_logits = PeftModel.from_pretrained(base, f"{out}/hf").eval()(input_ids=input_ids).logits
        merged = AutoModelForCausalLM.from_pretrained(f"{out}/hf_merged", dtype=torch.float32).eval()
        merged_logits = merged(input_ids=input_ids).logits
    torch.testing.assert_close(holder["logits"], peft_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_logits, peft_logits, rtol=1e-5, atol=1e-5)
    assert (peft_logits - base_logits).abs().max() > 1e-3  # the adapter trained

    # Resumed from the checkpoint before the last step: that step again, bit for bit.
    if tp == 2:
        resumed_results = run_ranks(tp * pp, _resume_last_step, model_dir, out, tp, pp, timeout_s=600)
        for result, resumed in zip(results, resumed_results, strict=True):
            last = result["history"][-1]
            assert (resumed["loss"], resumed["grad_norm"]) == (last["loss"], last["grad_norm"])
