"""hf_merged/ of a LoRA run is written by all ranks from their shards: it loads with
`from_pretrained` and equals PEFT's own `merge_and_unload()` of the gathered adapter on the base
model, for FSDP (dp 2) and tensor-parallel (tp 2: column- and row-parallel adapters) shards, tied
and untied heads; and no rank gathers or writes a whole sharded base matrix."""

from __future__ import annotations

import os

import pytest
import torch
from peft import PeftModel
from tests.unit.distributed_helpers import run_ranks
from tests.unit.models.policy.policy_test_utils import policy_config, save_tiny_llama
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from nemo_rl.config.schema import LoRAConfig
from nemo_rl.models.lora_merge import lora_merge_slices
from nemo_rl.models.policy import hf_export
from nemo_rl.models.policy.workers.dtensor_policy_worker import DTensorPolicyWorker
from nemo_rl.models.sharded_loading import local_slice

DIM, ALPHA = 4, 8
LORA = {"enabled": True, "dim": DIM, "alpha": ALPHA, "dropout": 0.0}  # every *_proj
SHARDED_BY_BOTH = ("q_proj.weight", "o_proj.weight", "up_proj.weight", "down_proj.weight")


@torch.no_grad()
def _random_adapters(model: torch.nn.Module) -> None:
    """B starts at zero; give every lora_B a value (the same on every rank) so the merge shows."""
    for name, param in model.named_parameters():
        if ".lora_B." in name:
            whole = torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name)))
            offset, shape = local_slice(param)
            local = param.to_local() if isinstance(param, DTensor) else param
            local.copy_(whole[tuple(slice(o, o + s) for o, s in zip(offset, shape))])


def _export(rank, model_dir, dtensor_cfg, out):
    worker = DTensorPolicyWorker(policy_config(model_dir, dtensor_cfg={**dtensor_cfg, "lora_cfg": LORA}), seed=1, device="cpu")
    _random_adapters(worker.model)
    gathered, written = [], {}
    full_tensor, write_slice = DTensor.full_tensor, hf_export._write_slice

    def recording_full_tensor(self, *args, **kwargs):
        gathered.append(tuple(self.shape))
        return full_tensor(self, *args, **kwargs)

    def recording_write_slice(fd, entry, offset, local):
        written[entry.key] = (entry.shape, tuple(local.shape))
        return write_slice(fd, entry, offset, local)

    DTensor.full_tensor, hf_export._write_slice = recording_full_tensor, recording_write_slice
    try:
        worker.save_checkpoint(weights_path=None, hf_path=os.path.join(out, "hf"), hf_merged_path=os.path.join(out, "hf_merged"))
    finally:
        DTensor.full_tensor, hf_export._write_slice = full_tensor, write_slice
    adapter_shapes = {tuple(p.shape) for n, p in worker.model.named_parameters() if ".lora_" in n}
    worker.shutdown()
    return {"gathered": gathered, "written": written, "adapter_shapes": adapter_shapes}


CASES = {
    "dp2_tied": ({}, True),
    "tp2_untied": ({"tensor_parallel_size": 2}, False),
}


@pytest.mark.slow  # two gloo ranks each: ~1 min per case on a busy 2-core machine
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_merged_export_from_shards_equals_peft_merge_and_unload(tmp_path, case):
    dtensor_cfg, tied = CASES[case]
    model_dir = save_tiny_llama(str(tmp_path / "base"), tie_word_embeddings=tied)
    out = str(tmp_path / "out")
    results = run_ranks(2, _export, model_dir, dtensor_cfg, out)

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    want = PeftModel.from_pretrained(base, os.path.join(out, "hf")).merge_and_unload().state_dict()
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "hf_merged"), dtype="auto")
    assert merged.config.tie_word_embeddings == tied
    assert (merged.get_output_embeddings().weight is merged.get_input_embeddings().weight) == tied
    got = merged.state_dict()
    assert set(got) == set(want)
    untouched = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    adapted = [k for k in want if k.endswith("_proj.weight")]
    assert len(adapted) == 14
    for key, tensor in want.items():
        assert got[key].dtype == torch.float32, key
        torch.testing.assert_close(got[key], tensor, rtol=1e-6, atol=1e-6, msg=key)
        if key in adapted:  # the adapter did change it
            assert (got[key] - untouched[key]).abs().max() > 1e-2, key
        else:
            assert torch.equal(got[key], untouched[key]), key

    for rank, result in enumerate(results):
        # Only the adapter was gathered; the base weights never were.
        assert result["gathered"] and set(result["gathered"]) <= result["adapter_shapes"], f"rank {rank}"
        # Each rank wrote only its slice of the sharded matrices, adapted or not.
        for suffix in SHARDED_BY_BOTH + ("embed_tokens.weight",):
            keys = [k for k in result["written"] if k.endswith(suffix)]
            assert keys, suffix
            for key in keys:
                whole, local = result["written"][key]
                assert local != whole and 2 * torch.Size(local).numel() == torch.Size(whole).numel(), f"rank {rank}: {key}"


def test_slice_transform_adds_the_slice_of_the_adapter_product():
    """The arithmetic on its own: every 2 x 3 block of the merged weight, computed from W's
    block and the whole adapter, equals that block of W + scale * B @ A."""
    g = torch.Generator().manual_seed(0)
    W, A, B = (torch.randn(shape, generator=g) for shape in ((6, 9), (DIM, 9), (6, DIM)))
    cfg = LoRAConfig(enabled=True, dim=DIM, alpha=ALPHA)
    merge = lora_merge_slices({"proj.lora_A.weight": A, "proj.lora_B.weight": B}, cfg, base_keys={"proj.weight", "norm.weight"})
    want = W + (ALPHA / DIM) * (B @ A)
    for r in range(0, 6, 2):
        for c in range(0, 9, 3):
            got = merge("proj.weight", W[r : r + 2, c : c + 3], (r, c))
            torch.testing.assert_close(got, want[r : r + 2, c : c + 3], rtol=1e-6, atol=1e-6)
    norm = torch.ones(6)
    assert merge("norm.weight", norm, (0,)) is norm
    with pytest.raises(KeyError, match=r"proj\.weight \(the base of proj\.lora_A\.weight\)"):
        lora_merge_slices({"proj.lora_A.weight": A, "proj.lora_B.weight": B}, cfg, base_keys={"norm.weight"})
