"""``main``: parse, run the verb, and turn the errors a user can fix into one line and exit 1."""
from __future__ import annotations

import sys
from typing import Sequence

import torch

from .._runs import RunError, eprint
from .common import _error_text
from .parser import build_parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Entry point of the ``scoresde`` console script and ``python -m scoresde``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or "scoresde"
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.command == "likelihood" and args.bits is not None and args.data_range is None:
        parser.error("--bits needs --data-range A B (and --dequantization): bits/dim of discrete data are "
                     "measured on the data's range")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return args.func(args, argv, prog)
    except (RunError, FileNotFoundError) as err:
        msg = f"{type(err).__name__}: {err}" if isinstance(err, FileNotFoundError) else str(err)
        eprint(f"{prog} {args.command}: error: {msg}")
        return 1
    except OSError as err:      # a failed write (disk full, file size limit) or read
        eprint(f"{prog} {args.command}: error: {_error_text(err)}")
        return 1
    except ImportError as err:  # an optional extra is missing (scoresde.data.MissingExtraError); others propagate
        if not getattr(err, "extra", None):
            raise
        eprint(f"{prog} {args.command}: error: {err}")
        return 1
    except (ValueError, TypeError) as err:  # bad input caught by the library (checkpoint, data, options)
        eprint(f"{prog} {args.command}: error: {type(err).__name__}: {err}")
        return 1
