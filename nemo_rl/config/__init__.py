"""Configs: YAML with `defaults:` inheritance, interpolation and overrides -> a validated MasterConfig.

    from nemo_rl.config import load_config
    cfg = load_config("configs/sft.yaml", ["policy.optimizer.kwargs.lr=1e-5"])

See docs/config.md.
"""

from nemo_rl.config.cli import parse_run_args
from nemo_rl.config.errors import ConfigError
from nemo_rl.config.loader import compose_config, config_to_yaml, load_config
from nemo_rl.config.schema import MasterConfig

__all__ = [
    "ConfigError",
    "MasterConfig",
    "compose_config",
    "config_to_yaml",
    "load_config",
    "parse_run_args",
]
