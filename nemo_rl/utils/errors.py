"""Turning the errors a user can fix into a short message and a non-zero exit code."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def exit_on_user_error(error_types: tuple[type[BaseException], ...], exit_code: int = 1) -> Iterator[None]:
    """Prints an error of `error_types` as `error: <message>` on stderr and exits.

    Those errors describe what the user must fix (data, config, resources, a worker's own
    traceback), so the driver's traceback would only bury the message. Other errors propagate.
    """
    try:
        yield
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except error_types as error:
        from rich.console import Console
        from rich.markup import escape

        Console(stderr=True, highlight=False, soft_wrap=True).print(
            f"[bold red]error ({type(error).__name__}):[/] {escape(str(error))}"
        )
        raise SystemExit(exit_code) from None
