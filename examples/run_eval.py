"""Evaluation entry point: a checkpoint's score on a benchmark.

    uv run examples/run_eval.py --config configs/eval.yaml [key.path=value ...]
    uv run examples/run_eval.py --config configs/eval.yaml generation.model_name=results/sft_tiny_lora/step_150/hf

See docs/eval.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Running as `uv run examples/run_eval.py` puts examples/ on sys.path, not the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nemo_rl.algorithms.eval import run_evaluation  # noqa: E402
from nemo_rl.config import ConfigError, parse_run_args  # noqa: E402
from nemo_rl.config.eval_schema import EvalMasterConfig  # noqa: E402
from nemo_rl.data import DataError  # noqa: E402
from nemo_rl.distributed import ClusterResourceError, WorkerError  # noqa: E402
from nemo_rl.models.generation import GenerationBackendError  # noqa: E402
from nemo_rl.utils.errors import exit_on_user_error  # noqa: E402

# What a user fixes in their config, data, checkpoint or environment; anything else keeps its traceback.
USER_ERRORS = (ConfigError, DataError, ClusterResourceError, WorkerError, FileNotFoundError, GenerationBackendError)
DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "eval.yaml")


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_run_args(argv, default_config=DEFAULT_CONFIG, description=__doc__, root=EvalMasterConfig)
    with exit_on_user_error(USER_ERRORS):
        run_evaluation(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
