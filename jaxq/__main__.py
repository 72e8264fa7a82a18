"""``python -m jaxq ...``: the same as the ``jaxq`` console script."""

import sys

from jaxq.cli import main

if __name__ == "__main__":
    sys.exit(main())
