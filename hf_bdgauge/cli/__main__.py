"""``python -m hf_bdgauge.cli`` (and ``torchrun … -m hf_bdgauge.cli``): the ``bdgauge`` command."""

import sys

from .main import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
