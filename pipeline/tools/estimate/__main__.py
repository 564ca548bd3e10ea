"""``python -m pipeline.tools.estimate ...``: runs the command (``cli.main``) and exits with its status."""

import sys

from pipeline.tools.estimate.cli import main

if __name__ == "__main__":
    sys.exit(main())
