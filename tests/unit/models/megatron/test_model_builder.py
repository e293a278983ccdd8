"""`transformer_config_from_hf` refuses what it cannot map exactly, naming the model type and the
feature; the GPU path's modules never import the CPU shims."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from transformers import GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

from nemo_rl.models.megatron.model_builder import UnsupportedHFModelError, padded_vocab_size, transformer_config_from_hf

MEGATRON_PACKAGE = Path(__file__).resolve().parents[4] / "nemo_rl" / "models" / "megatron"
_SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize(
    ("hf_config", "words"),
    [
        (GemmaConfig(**_SMALL), ["'gemma'", "llama, qwen2, qwen3, mistral"]),
        (LlamaConfig(hidden_act="gelu", **_SMALL), ["'llama'", "hidden_act='gelu'"]),
        (LlamaConfig(attention_bias=True, **_SMALL), ["'llama'", "attention_bias"]),
        (LlamaConfig(mlp_bias=True, **_SMALL), ["mlp_bias"]),
        (MistralConfig(sliding_window=4096, **_SMALL), ["'mistral'", "sliding_window=4096"]),
        (Qwen2Config(use_sliding_window=True, **_SMALL), ["'qwen2'", "use_sliding_window"]),
        (
            LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}, **_SMALL),
            ["'llama'", "rope_type='linear'"],
        ),
    ],
)
def test_unsupported_families_and_features_are_refused_by_name(hf_config, words):
    with pytest.raises(UnsupportedHFModelError) as error:
        transformer_config_from_hf(hf_config)
    for word in words:
        assert word in str(error.value)


def test_layouts_that_do_not_divide_the_model_are_refused():
    with pytest.raises(UnsupportedHFModelError, match="num_key_value_heads=2"):
        transformer_config_from_hf(LlamaConfig(**_SMALL), tensor_parallel_size=4)
    with pytest.raises(UnsupportedHFModelError, match="num_hidden_layers=2"):
        transformer_config_from_hf(LlamaConfig(**_SMALL), pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)


def test_vocab_is_padded_to_a_multiple_of_the_tensor_parallel_size():
    assert padded_vocab_size(128256, 8) == 128256
    assert padded_vocab_size(127, 2) == 128
    assert padded_vocab_size(151665, 4) == 151668


def _imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


@pytest.mark.parametrize("module", ["model_builder.py", "hf_conversion.py", "parallel_state.py", "__init__.py"])
def test_gpu_path_never_imports_the_cpu_shims(module):
    imported = _imported_modules(MEGATRON_PACKAGE / module)
    assert not any("cpu_support" in name for name in imported), f"{module} imports cpu_support"


def test_sequence_parallel_without_transformer_engine_is_refused():
    pytest.importorskip("megatron.core", reason="megatron-core is the optional `megatron` extra (uv sync --extra megatron)")
    from nemo_rl.models.megatron.model_builder import transformer_engine_available

    if transformer_engine_available():
        pytest.skip("Transformer Engine is installed: sequence parallelism is available")
    with pytest.raises(UnsupportedHFModelError, match="sequence_parallel=True needs Transformer Engine"):
        transformer_config_from_hf(LlamaConfig(**_SMALL), tensor_parallel_size=2, sequence_parallel=True)
