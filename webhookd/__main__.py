"""``python -m webhookd``: the same command line as the ``webhookd`` console script."""

import sys

from webhookd.cli import main

if __name__ == "__main__":
    sys.exit(main())
