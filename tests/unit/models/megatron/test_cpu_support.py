"""megatron-core on CPU with the shims: gradients through tensor parallelism equal the HF
model's (also with activation recomputation), virtual pipeline stages load and read back the right layers, and the shims come off."""

from __future__ import annotations

import pytest
import torch

from tests.unit.distributed_helpers import run_ranks
from tests.unit.models.megatron.megatron_test_utils import (
    SEQ_LEN,
    gradients_virtual_stages_and_shims_scenario,
    make_tiny_hf_model,
    sample_input_ids,
)


@pytest.mark.slow
def test_tp_gradients_recompute_virtual_stages_and_reversible_shims(tmp_path):
    pytest.importorskip("megatron.core", reason="megatron-core is the optional `megatron` extra (uv sync --extra megatron)")
    model = make_tiny_hf_model("llama_untied_gqa", tmp_path / "hf")
    deep = make_tiny_hf_model("qwen3_qk_norm", tmp_path / "deep", seed=3, num_hidden_layers=4)
    loss_weights = torch.randn(2, SEQ_LEN, model.config.vocab_size, generator=torch.Generator().manual_seed(5))

    rank0, rank1 = run_ranks(2, gradients_virtual_stages_and_shims_scenario, str(tmp_path / "hf"), str(tmp_path / "deep"), loss_weights, timeout_s=600)

    (model(sample_input_ids(model.config.vocab_size)).logits * loss_weights).sum().backward()
    expected_grads = {name: p.grad for name, p in model.named_parameters()}
    assert rank0["grads"].keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        # Summation order differs (per-shard matmuls, all-reduces): fp32 error relative to the
        # tensor's scale, not to each element (tiny elements are sums of large cancelling terms).
        scale = grad.abs().max().item()
        torch.testing.assert_close(rank0["grads"][name], grad, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"gradient of {name}: {m}")
    assert rank1["grads"] == {}  # the state dict is returned on the first rank only
    # Recomputing the layers in the backward gives the same gradients, bit for bit.
    assert all(torch.equal(rank0["grads_recomputed"][k], v) for k, v in rank0["grads"].items())

    # Rank 0 holds virtual stages 0 and 2 (layers 0 and 2), rank 1 stages 1 and 3.
    assert rank0["virtual_stage_layers"] == [[0], [2]] and rank1["virtual_stage_layers"] == [[1], [3]]
    # Tied embeddings: HF's state dict also lists lm_head.weight (the same tensor); checkpoints omit it.
    original = {k: v for k, v in deep.state_dict().items() if k != "lm_head.weight"}
    assert rank0["virtual_stage_state"].keys() == original.keys()
    assert all(torch.equal(rank0["virtual_stage_state"][k], v) for k, v in original.items())

    for result in (rank0, rank1):
        assert result["cpu_tensor_type_under_shims"] == "torch.cuda.FloatTensor"
        assert result["cuda_factory_device_under_shims"] == "cpu"
        assert result["restored"] and result["cuda_factory_raises_after_disable"]
