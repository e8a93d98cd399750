"""`python -m gspo ...` (what torchrun launches): the same as the `gspo` command."""

import sys

from gspo.cli import main

if __name__ == "__main__":
    sys.exit(main())
