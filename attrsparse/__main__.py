"""``python -m attrsparse ...``; also the entry point of distributed runs:
``torchrun --nproc-per-node N -m attrsparse sweep ...`` (see docs/distributed.md)."""

import sys

from .cli.main import main

sys.exit(main())
