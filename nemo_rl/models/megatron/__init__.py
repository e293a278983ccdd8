"""The Megatron-core backend's model layer: `model_builder` (HF config -> megatron-core `GPTModel`),
`hf_conversion` (HF <-> Megatron weights), `parallel_state` (megatron-core's process groups) and
`cpu_support` (CPU-only shims, for tests). megatron-core is the optional `megatron` extra; nothing
here imports it at module level."""
