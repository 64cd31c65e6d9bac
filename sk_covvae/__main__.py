"""``python -m sk_covvae``: the ``covvae`` command line."""

import sys

from sk_covvae.cli import main

if __name__ == "__main__":
    sys.exit(main())
