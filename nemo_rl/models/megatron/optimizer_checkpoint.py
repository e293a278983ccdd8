"""In which form the distributed optimizer's states are checkpointed, and which form a resume reads.

megatron-core's `DistributedOptimizer.sharded_state_dict` writes one of several forms
(`metadata["distrib_optim_sharding_type"]`); on megatron-core 0.16 with the plain PyTorch Adam
(no Transformer Engine or apex):

  fully_reshardable   written here. Each parameter's Adam moments (and fp32 master copy) in the
                      parameter's own shape, sharded like the parameter, so they load into
                      another tensor / pipeline / data-parallel layout, as the weights do. Cost:
                      the save all-gathers each model-parallel shard's states over its
                      data-parallel group, and a load reads its whole model-parallel shard before
                      keeping its data-parallel part (host memory: about 3 x 4 bytes per
                      parameter / (TP x PP) per rank, briefly).
  dp_reshardable      what earlier checkpoints hold: the optimizer's flat buffers as they are,
                      written and read without communication, but tied to the tensor / pipeline
                      sizes (they fix how parameters are laid out in the buffers).

`layout.json`, next to the states, records the tensor / pipeline sizes and the form; a
checkpoint without the form is `dp_reshardable`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

LAYOUT_FILE = "layout.json"
WRITTEN_FORM = "fully_reshardable"
_EARLIER_FORM = "dp_reshardable"
_FORM_KEY = "optimizer_sharding"


def sharding_metadata(form: str) -> dict[str, str]:
    """The `metadata` argument of `DistributedOptimizer.sharded_state_dict` for `form`."""
    return {"distrib_optim_sharding_type": form}


def write_layout(optimizer_path: str, layout: dict[str, int]) -> None:
    with open(os.path.join(optimizer_path, LAYOUT_FILE), "w") as f:
        json.dump({**layout, _FORM_KEY: WRITTEN_FORM}, f)


def form_to_read(optimizer_path: str, layout: dict[str, int]) -> str:
    """The form the checkpoint at `optimizer_path` was written in; raises ValueError when it
    cannot load into `layout` (the tensor / pipeline sizes of this run)."""
    layout_file = os.path.join(optimizer_path, LAYOUT_FILE)
    saved: dict = {}
    if os.path.exists(layout_file):
        with open(layout_file) as f:
            saved = json.load(f)
    form = saved.pop(_FORM_KEY, _EARLIER_FORM)
    if form == _EARLIER_FORM and saved and saved != layout:
        raise ValueError(
            f"{optimizer_path}: the optimizer state was saved with {saved} in megatron-core's "
            f"{_EARLIER_FORM!r} form, which reshards over data-parallel ranks only, and this run has "
            f"{layout}. Resume with the saved tensor / pipeline sizes (the weights alone load into any "
            "layout); checkpoints written since then reshard to any layout"
        )
    return form


def load_optimizer_state(optimizer: Any, state_dict: Any) -> None:
    """`optimizer.load_state_dict(state_dict)` for megatron-core's (chained) optimizer, with two
    repairs on the plain PyTorch Adam path (no Transformer Engine or apex), where the Adam `step`
    travels in the param groups rather than with each parameter's states:

    - the `fully_reshardable` form: megatron-core 0.16 copies every entry of a parameter's torch
      state from the loaded one, `step` included, which the loaded one lacks (a KeyError); the
      parameter states are loaded here with each `step` set aside;
    - every form: the loaded `step` is one tensor shared by all parameters, which torch's Adam
      advances once per parameter at each step (the bias correction then drifts); each parameter
      gets its own copy.
    """
    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    if len(inners) != 1:
        optimizer.load_state_dict(state_dict)
        return
    (inner,) = inners
    torch_optimizer = getattr(inner, "optimizer", None)
    if not isinstance(torch_optimizer, torch.optim.Adam | torch.optim.AdamW):
        inner.load_state_dict(state_dict)
        return
    param_state = None
    if isinstance(state_dict, dict) and state_dict.get("param_state_sharding_type") == "fully_reshardable":
        state_dict = dict(state_dict)
        param_state = state_dict.pop("param_state")
        del state_dict["param_state_sharding_type"]
    inner.load_state_dict(state_dict)  # param groups (with the step), grad scaler, other forms' states
    if param_state is not None:
        steps = {p: state.pop("step") for p, state in torch_optimizer.state.items() if "step" in state}
        inner.load_parameter_state_from_fully_reshardable(param_state)
        for p, step in steps.items():
            torch_optimizer.state[p]["step"] = step
    for state in torch_optimizer.state.values():
        if "step" in state:
            state["step"] = state["step"].detach().clone()
