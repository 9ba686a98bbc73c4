"""`python -m memory3`: the command line (memory3.cli)."""

import sys

from memory3.cli import main

if __name__ == "__main__":
    sys.exit(main())
