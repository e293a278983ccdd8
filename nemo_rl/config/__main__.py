"""`python -m nemo_rl.config show --config X.yaml [overrides]`"""

from nemo_rl.config.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
