"""``python -m collage_optax``: the ``collage-optax`` command line."""

import sys

from collage_optax.cli import main

if __name__ == "__main__":
  sys.exit(main())
