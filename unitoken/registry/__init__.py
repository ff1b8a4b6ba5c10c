"""Model registry on MLflow: registration with a passport, compare-and-swap promotion, alias
history, rollback, lineage, and ``models:/`` URIs for every command.

**Passport.** A JSON chain of entries (data -> stage 1..3 -> evaluation -> gate -> build); each
entry carries the sha256 of the previous one, so no entry can change without breaking every
later link. It is stored with the registration run and inside the model, and its digest is a
version tag and part of the MLmodel.

**The version is an MLflow model.** ``unitoken.registry.serving.package`` writes a pyfunc (models from
code) around the hand-off, with a signature and an input example; the LoggedModel is an output
of the registration run and of the last stage's run, carries the evaluation metrics (so the
model page shows the scores), and the version's description is a Markdown lineage with links.

**Compare-and-swap without lock models.** MLflow aliases have no CAS, but a run's params are
immutable: logging a different value under an existing key is refused by the tracking store's
primary key. Each registered model has a *ledger run* (``registry-ledger-NAME``, found through
the param ``unitoken.ledger_run`` of version 1's registration run, which is itself claimed that
way); the n-th move of alias A is claimed as ledger param ``A.<n>`` holding the intended move.
Of two racing promoters exactly one claim is stored; the other gets ``ConflictError``. Then the
alias moves, then the move is recorded as registered-model tag ``unitoken.history.A.<n>`` (MLflow
keeps no alias history, mlflow/mlflow#2169). A promoter killed between claim and record leaves a
claim without a record: the next ``promote`` completes it (the alias did move) or records it as
rolled back (it did not), once the claim is older than ``UNITOKEN_PROMOTION_LEASE_S`` (120 s;
younger claims are a promotion in progress and get ``ConflictError``).
"""

from unitoken.registry.aliases import history, history_markdown, promote, rollback
from unitoken.registry.common import ConflictError, RegistryError
from unitoken.registry.passport import (
           build_passport,
           canonical_sha,
           chain,
           verify_chain,
           verify_evidence,
)
from unitoken.registry.uris import (
           fetch,
           lineage,
           load_uri,
           model_dir,
           packaged_artifact,
           parse_uri,
           resolve,
           verify_version,
)
from unitoken.registry.versions import (
           lineage_markdown,
           register,
           registration_note,
           version_of_handoff,
)

__all__ = ["ConflictError", "RegistryError", "build_passport", "canonical_sha", "chain", "fetch", "history",
           "history_markdown", "lineage", "lineage_markdown", "load_uri", "model_dir", "packaged_artifact", "parse_uri",
           "promote", "register", "registration_note", "resolve", "rollback", "verify_chain", "verify_evidence",
           "verify_version", "version_of_handoff"]
