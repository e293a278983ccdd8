"""Supervised fine-tuning entry point.

    uv run examples/run_sft.py --config configs/sft_tiny.yaml [key.path=value ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Running as `uv run examples/run_sft.py` puts examples/ on sys.path, not the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nemo_rl.algorithms.resume import ResumeError  # noqa: E402
from nemo_rl.algorithms.sft import setup, sft_train  # noqa: E402
from nemo_rl.config import parse_run_args  # noqa: E402
from nemo_rl.config import ConfigError  # noqa: E402
from nemo_rl.data import DataError  # noqa: E402
from nemo_rl.distributed import ClusterResourceError, WorkerError  # noqa: E402
from nemo_rl.utils.errors import exit_on_user_error  # noqa: E402
from nemo_rl.utils.preflight import PreflightError  # noqa: E402

# What a user fixes in their config, data or cluster; anything else is a bug and keeps its traceback.
USER_ERRORS = (
    ConfigError, DataError, ClusterResourceError, WorkerError, FloatingPointError, FileNotFoundError,
    ResumeError, PreflightError,
)
DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "sft.yaml")


def main(argv: list[str] | None = None) -> int:
    cfg, config_path = parse_run_args(argv, default_config=DEFAULT_CONFIG, description=__doc__)
    with exit_on_user_error(USER_ERRORS):
        run = setup(cfg, config_path)
        try:
            sft_train(run)
        finally:
            run.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
