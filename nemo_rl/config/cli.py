"""Command-line entry points: `parse_run_args` for the example scripts and `show`.

    uv run examples/run_sft.py --config configs/sft.yaml sft.max_num_steps=100
    python -m nemo_rl.config show --config configs/sft.yaml policy.precision=float32

A user error prints one red 'config error:' message (no traceback) and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from pydantic import BaseModel

from nemo_rl.config.errors import ConfigError
from nemo_rl.config.loader import config_to_yaml, load_config
from nemo_rl.config.schema import MasterConfig

USER_ERROR_EXIT_CODE = 2

OVERRIDES_HELP = """\
overrides (Hydra's grammar, applied in order after the YAML is composed):
  a.b=c        set an existing key            policy.optimizer.kwargs.lr=1e-5
  ++a.b=c      add or set a key               ++policy.optimizer.kwargs.amsgrad=true
  +a.b=c       add a key that does not exist  +logger.wandb.entity=my-team
  ~a.b         delete a key                   ~policy.optimizer.kwargs.eps
  values: numbers, true/false, null, "quoted strings", lists [1,2], mappings {a: 1}
"""


def print_config_error(error: ConfigError) -> None:
    """The message to stderr with a red 'config error:' prefix (plain text when not a terminal)."""
    from rich.console import Console
    from rich.text import Text

    console = Console(stderr=True, soft_wrap=True)
    console.print(Text.assemble(("config error: ", "bold red"), str(error)), highlight=False)


def exit_with_config_error(error: ConfigError) -> NoReturn:
    print_config_error(error)
    raise SystemExit(USER_ERROR_EXIT_CODE)


def _split_overrides(parser: argparse.ArgumentParser, rest: list[str]) -> list[str]:
    options = [item for item in rest if item.startswith("-")]
    if options:
        parser.error(
            f"unrecognized option(s): {' '.join(options)} "
            "(overrides look like key=value, ++key=value, +key=value or ~key)"
        )
    return rest


def parse_run_args(
    argv: list[str] | None, *, default_config: str, description: str, root: type[BaseModel] = MasterConfig
) -> tuple[MasterConfig, str]:
    """`--config X.yaml` then overrides -> (validated config, config path). `root`: the schema
    of the file (MasterConfig for training, EvalMasterConfig for evaluation).

    On a ConfigError prints the message to stderr and exits with code 2.
    """
    parser = argparse.ArgumentParser(
        description=description,
        epilog=OVERRIDES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", default=default_config, help=f"YAML config to start from (default: {default_config})"
    )
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    overrides = _split_overrides(parser, rest)
    try:
        cfg = load_config(args.config, overrides, root=root)
    except ConfigError as error:
        exit_with_config_error(error)
    return cfg, args.config


def _print_yaml(text: str) -> None:
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.syntax import Syntax

        Console().print(Syntax(text, "yaml", background_color="default", word_wrap=True))
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """`python -m nemo_rl.config show --config X.yaml [overrides]`"""
    parser = argparse.ArgumentParser(
        prog="python -m nemo_rl.config",
        description="Inspect configs: compose, override, validate.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    show = commands.add_parser(
        "show",
        help="print the composed, validated config as YAML",
        description="Print the composed, validated config as YAML.",
        epilog=OVERRIDES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("--config", required=True, help="YAML config, e.g. configs/sft.yaml")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    overrides = _split_overrides(show, rest)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as error:
        exit_with_config_error(error)
    try:
        _print_yaml(config_to_yaml(cfg))
    except BrokenPipeError:  # `... | head`
        sys.stderr.close()
    return 0
