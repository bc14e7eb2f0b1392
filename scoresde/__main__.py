"""``python -m scoresde``: the ``scoresde`` command (see :mod:`scoresde.cli`)."""
import shlex
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog=f"{shlex.quote(sys.executable)} -m scoresde"))
