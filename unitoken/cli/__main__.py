"""``python -m unitoken.cli ...`` (what torchrun and deepspeed launch): the ``unitoken`` command."""

import sys

from unitoken.cli import main

sys.exit(main())
