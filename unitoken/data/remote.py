"""Data and tokenizers by URI: a local path, or ``s3://bucket/prefix`` fetched into a cache.

Whole prefixes are fetched by ``materialise``; ``fetch_images`` fetches only the named images
of a prefix (a pre-tokenisation worker fetches the images of its own shards, never the corpus).

Credentials come from the environment only (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
on a cluster from a Kubernetes secret); the endpoint from ``AWS_ENDPOINT_URL_S3``,
``AWS_ENDPOINT_URL`` or ``MLFLOW_S3_ENDPOINT_URL`` (SeaweedFS, MinIO, ...). Transient S3 errors
are retried with exponential backoff by botocore (``standard`` mode); a persistent one fails with
the URI and the cause, never with a half-written cache: objects land under a temporary name
and the cache directory is complete only once ``.complete`` exists.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable
from pathlib import Path


class RemoteDataError(RuntimeError):
    """A data URI cannot be read; the message names the URI and the cause."""


def s3_client(max_attempts: int = 6):
    import boto3
    from botocore.config import Config

    endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                or os.environ.get("MLFLOW_S3_ENDPOINT_URL"))
    return boto3.client("s3", endpoint_url=endpoint, region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                        config=Config(retries={"max_attempts": max_attempts, "mode": "standard"},
                                      connect_timeout=5, read_timeout=30))


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise RemoteDataError(f"{uri}: no bucket; use s3://BUCKET/PREFIX")
    return bucket, prefix.strip("/")


def materialise(uri: str, dest: Path, client=None) -> Path:
    """A local path for ``uri``: the path itself, or the S3 prefix downloaded into ``dest``.

    Raises:
        RemoteDataError: the path does not exist, the prefix is empty, or S3 keeps failing.
    """
    if not uri.startswith("s3://"):
        path = Path(uri.removeprefix("file://"))
        if not path.exists():
            raise RemoteDataError(f"{uri}: no such file or directory")
        return path
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3(uri)
    dest = Path(dest)
    if (dest / ".complete").is_file():
        return dest
    client = client or s3_client()
    try:
        keys = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/" if prefix else ""):
            keys += [o["Key"] for o in page.get("Contents", [])]
        if not keys:
            raise RemoteDataError(f"{uri}: no objects under this prefix")
        for key in keys:
            rel = key[len(prefix) + 1:] if prefix else key
            target = dest / rel
            if not target.resolve().is_relative_to(dest.resolve()):
                raise RemoteDataError(f"{uri}: object key {key!r} escapes the download directory")
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            client.download_file(bucket, key, str(tmp))
            tmp.replace(target)
    except (BotoCoreError, ClientError) as err:
        raise RemoteDataError(f"{uri}: S3 failed after retries ({type(err).__name__}: {err})") from err
    (dest / ".complete").write_text(f"{len(keys)} objects from {uri}\n")
    return dest


def object_key(prefix: str, rel: str) -> str:
    """The key of image ``rel`` (a manifest path, relative to the manifest) under ``prefix``.

    Raises:
        RemoteDataError: ``rel`` is absolute or leaves the prefix (``..``).
    """
    norm = posixpath.normpath(rel) if isinstance(rel, str) and rel else ""
    if not norm or norm.startswith(("/", "../")) or norm in (".", "..") or "\x00" in norm:
        raise RemoteDataError(f"image path {rel!r} is not inside the data prefix")
    return f"{prefix}/{norm}" if prefix else norm


def fetch_images(uri: str, rels: Iterable[str], dest: Path, client=None) -> int:
    """Download the images ``rels`` of the data prefix ``uri`` into ``dest`` (same relative paths);
    one already there is kept. Each lands under a temporary name first.

    Returns:
        how many objects were downloaded.

    Raises:
        RemoteDataError: a path leaves the prefix, or S3 keeps failing (the message names the key).
    """
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3(uri)
    dest = Path(dest)
    client = client or s3_client()
    fetched = 0
    for rel in dict.fromkeys(rels):
        key = object_key(prefix, rel)
        target = dest / key[len(prefix) + 1:] if prefix else dest / key
        if target.is_file():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        try:
            client.download_file(bucket, key, str(tmp))
        except (BotoCoreError, ClientError) as err:
            tmp.unlink(missing_ok=True)
            raise RemoteDataError(f"s3://{bucket}/{key}: S3 failed after retries ({type(err).__name__}: {err})") from err
        tmp.replace(target)
        fetched += 1
    return fetched


def upload_dir(local: Path, uri: str, client=None) -> int:
    """Upload a directory under an S3 prefix (used to publish synthetic data and by tests)."""
    bucket, prefix = split_s3(uri)
    client = client or s3_client()
    n = 0
    for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        key = "/".join(x for x in (prefix, path.relative_to(local).as_posix()) if x)
        client.upload_file(str(path), bucket, key)
        n += 1
    return n
