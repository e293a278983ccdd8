"""megatron-core's model-parallel groups on an already initialised torch.distributed.

The caller (a policy worker) has started torch.distributed (NCCL on GPUs, gloo on CPU);
`initialize_model_parallel` splits its ranks into megatron-core's tensor, pipeline, context and
data-parallel groups (order tp-cp-dp-pp, megatron-core's default: tensor-parallel ranks are
consecutive) and seeds megatron-core's model-parallel RNG streams; `destroy_model_parallel`
undoes it so that another layout can be initialised in the same process.
"""

from __future__ import annotations


def initialize_model_parallel(
    tensor_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    context_parallel_size: int = 1,
    *,
    seed: int = 1234,
    expert_model_parallel_size: int = 1,
) -> None:
    """Create megatron-core's process groups for this layout and seed its RNG streams.

    On a machine without CUDA, `cpu_support.enable_megatron_on_cpu()` must have been called first
    (megatron-core's RNG tracker is CUDA's).

    The data-parallel size is what remains: world size / (tp x pp x cp).

    Raises:
        RuntimeError: torch.distributed is not initialised.
        ValueError: the layout does not divide the world size.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        raise RuntimeError(
            "initialize_model_parallel needs torch.distributed initialised first "
            "(torch.distributed.init_process_group with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT)"
        )
    world_size = dist.get_world_size()
    model_parallel = tensor_parallel_size * pipeline_model_parallel_size * context_parallel_size
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size={tensor_parallel_size} x "
            f"pipeline_model_parallel_size={pipeline_model_parallel_size} x context_parallel_size={context_parallel_size}"
        )
    if virtual_pipeline_model_parallel_size is not None and pipeline_model_parallel_size < 2:
        raise ValueError(
            f"virtual_pipeline_model_parallel_size={virtual_pipeline_model_parallel_size} needs "
            f"pipeline_model_parallel_size >= 2, got {pipeline_model_parallel_size}"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    """Forget megatron-core's process groups (torch.distributed itself stays initialised)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def model_parallel_is_initialized() -> bool:
    from megatron.core import parallel_state

    return parallel_state.model_parallel_is_initialized()
