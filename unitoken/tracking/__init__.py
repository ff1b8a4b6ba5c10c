"""MLflow, in one place: ``store`` builds every client and knows the default tracking URI, the
experiments, batched logging and the artifact retries; ``runs`` is a training stage's tracker
(queued, outage-proof) and the replay of what it could not send."""

from unitoken.tracking.runs import MLflowTracker, NullTracker, replay
from unitoken.tracking.store import (
    ArtifactLogError,
    client,
    default_tracking_uri,
    ensure_experiment,
    experiment_for,
    log_batched,
    parent_run_from_env,
    with_artifact_retries,
)

__all__ = ["ArtifactLogError", "MLflowTracker", "NullTracker", "client", "default_tracking_uri", "ensure_experiment",
           "experiment_for", "log_batched", "parent_run_from_env", "replay", "with_artifact_retries"]
