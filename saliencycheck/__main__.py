"""The ``saliencycheck`` command and ``python -m saliencycheck``.

Signals are handled from the first instant: the command line's own imports take a while
(typer, rich, pydantic), and a Ctrl-C or a SIGTERM then ends the process with one line and
exit 130 or 143, like one that comes later, never with a traceback.
"""

import signal
import sys

from saliencycheck.errors import Terminated


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        try:
            from saliencycheck.cli import main as cli_main
        except KeyboardInterrupt as stop:
            terminated = isinstance(stop, Terminated)
            name = "terminated (SIGTERM)" if terminated else "interrupted"
            sys.stderr.write(f"{name}: stopped before any work; nothing was written\n")
            sys.exit(143 if terminated else 130)
        cli_main()
    finally:
        # The exit code is decided: a signal while the interpreter shuts down (torch's
        # finalizers) must not print a traceback or change it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


if __name__ == "__main__":
    main()
