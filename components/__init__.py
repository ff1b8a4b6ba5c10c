"""KFP components of the UniToken pipeline, one folder per step.

Each is a lightweight Python component on our image (``install_kfp_package=False``: the image
already has kfp and ``unitoken``), so the same component runs under ``kfp.local`` and on a
cluster. They hold no logic: each calls one function of ``unitoken.pipeline.steps``.
Compile one alone: ``python -m components.train_stage.component``.
"""

import os

from unitoken import __version__

IMAGE = os.environ.get("UNITOKEN_IMAGE", f"ghcr.io/unitoken/unitoken:{__version__}")
