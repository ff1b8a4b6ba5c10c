"""The registry's names (tags, params, the ledger's experiment) and its errors."""

from __future__ import annotations

HISTORY = "unitoken.history"


HANDOFF_TAG = "unitoken.handoff_sha256"  # a version's hand-off digest: one version per hand-off


LEDGER_PARAM = "unitoken.ledger_run"


MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # mlflow.utils.mlflow_tags.MLFLOW_MODEL_VERSIONS (import-free)


LEDGER_EXPERIMENT = "unitoken-registry"  # ledger runs live here, out of the training runs' table


OUTSIDE = "outside the CLI"


MOVED = ("done", "completed")  # record statuses of moves that happened (legacy records have none)


class RegistryError(RuntimeError):
    """A registry operation was refused; the message says why."""


class ConflictError(RegistryError):
    """Another promotion moved the alias first (or the alias is not where the caller expected)."""
