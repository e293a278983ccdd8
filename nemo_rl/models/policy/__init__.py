"""The policy: `Policy` (driver side) over `DTensorPolicyWorker`s (one per rank).

`Policy` is loaded on first use, so that importing the worker module alone (as worker
processes do) does not import Ray.
"""

from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS = {
    "Policy": "nemo_rl.models.policy.lm_policy",
    "DTensorPolicyWorker": "nemo_rl.models.policy.workers.dtensor_policy_worker",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from nemo_rl.models.policy.lm_policy import Policy
    from nemo_rl.models.policy.workers.dtensor_policy_worker import DTensorPolicyWorker


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
