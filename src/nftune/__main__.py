"""``python -m nftune`` is the ``nftune`` command."""

import sys

from nftune.cli import main

sys.exit(main())
