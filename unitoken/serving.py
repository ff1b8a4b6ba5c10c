"""The served model's old import path: models registered before the registry became a package
load ``unitoken.serving.UniTokenModel`` (their copy of the entry file names it). New models name
``unitoken.registry.serving``."""

from unitoken.registry.serving import UniTokenModel  # noqa: F401
