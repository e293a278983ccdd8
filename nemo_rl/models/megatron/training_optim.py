"""Megatron's optimizer, learning-rate schedule and gradient-reduction settings from
`policy.megatron_cfg` (nemo_rl/config/megatron_schema.py).

Megatron applies no weight decay to biases and 1-D parameters (norm weights), unlike
`torch.optim.AdamW` over every parameter on the DTensor backend; with weight_decay 0 the two
backends take the same steps.
"""

from __future__ import annotations

import importlib.util

import torch
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from nemo_rl.config.megatron_schema import MegatronConfig, MegatronDDPConfig, MegatronSchedulerConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def has_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def ddp_config(cfg: MegatronDDPConfig, *, use_distributed_optimizer: bool) -> DistributedDataParallelConfig:
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=cfg.grad_reduce_in_fp32,
        overlap_grad_reduce=cfg.overlap_grad_reduce,
        overlap_param_gather=cfg.overlap_param_gather and use_distributed_optimizer,
        use_distributed_optimizer=use_distributed_optimizer,
        average_in_collective=cfg.average_in_collective,
    )


def optimizer_config(cfg: MegatronConfig, *, precision: str) -> OptimizerConfig:
    opt = cfg.optimizer
    if opt.use_precision_aware_optimizer and not has_transformer_engine():
        raise ValueError(
            "policy.megatron_cfg.optimizer.use_precision_aware_optimizer=true needs Transformer "
            "Engine's FusedAdam, which is not installed; set it to false"
        )
    return OptimizerConfig(
        optimizer=opt.optimizer,
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        bf16=precision == "bfloat16",
        fp16=precision == "float16",
        params_dtype=DTYPES[opt.params_dtype],
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        sgd_momentum=opt.sgd_momentum,
        use_distributed_optimizer=opt.use_distributed_optimizer,
        use_precision_aware_optimizer=opt.use_precision_aware_optimizer,
        overlap_param_gather=cfg.distributed_data_parallel_config.overlap_param_gather and opt.use_distributed_optimizer,
        clip_grad=opt.clip_grad or 0.0,
    )


def build_optimizer(model_chunks: list[torch.nn.Module], cfg: MegatronConfig, *, precision: str):
    return get_megatron_optimizer(optimizer_config(cfg, precision=precision), model_chunks)


def build_scheduler(optimizer, cfg: MegatronConfig) -> OptimizerParamScheduler:
    """Warm-up from lr_warmup_init to optimizer.lr over lr_warmup_iters steps, then decay to
    optimizer.min_lr at lr_decay_iters (stepped once per optimizer step)."""
    sched: MegatronSchedulerConfig = cfg.scheduler
    opt = cfg.optimizer
    if sched.lr_decay_style != "constant" and sched.lr_decay_iters is None:
        raise ValueError(
            f"policy.megatron_cfg.scheduler.lr_decay_style={sched.lr_decay_style!r} needs lr_decay_iters "
            "(the step at which the rate reaches optimizer.min_lr)"
        )
    warmup = sched.lr_warmup_iters
    # Megatron requires the decay to end after the warm-up; a constant rate never reads it.
    decay = max(sched.lr_decay_iters or 0, warmup + 1)
    if sched.lr_decay_style != "constant" and decay != sched.lr_decay_iters:
        raise ValueError(
            f"policy.megatron_cfg.scheduler.lr_decay_iters={sched.lr_decay_iters} must exceed "
            f"lr_warmup_iters={warmup}"
        )
    start_wd = opt.weight_decay if sched.start_weight_decay is None else sched.start_weight_decay
    end_wd = opt.weight_decay if sched.end_weight_decay is None else sched.end_weight_decay
    return OptimizerParamScheduler(
        optimizer,
        init_lr=sched.lr_warmup_init,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay,
        lr_decay_style=sched.lr_decay_style,
        start_wd=start_wd,
        end_wd=end_wd,
        wd_incr_steps=decay,
        wd_incr_style=sched.weight_decay_incr_style,
        # The checkpoint's schedule wins on resume (it matches this config's by construction).
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
