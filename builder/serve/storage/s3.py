"""The S3 client, its errors turned into one-line StorageErrors (no secret ever printed), listing,
and the progress bar."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

from backends.errors import InvalidArgumentError, StorageError
from builder.progress import Transfer
from builder.serve.storage.index import MB, Progress, S3Location

# ---------------------------------------------------------------------- client and errors

@dataclass(frozen=True)
class TransferSettings:
    """Defaults chosen on loopback and small hosts: 8 MiB parts, 10 transfers in flight."""

    concurrency: int = 10
    part_size: int = 8 * MB
    hash_workers: int = 4


def make_client(endpoint_url: str | None, settings: TransferSettings):
    """An S3 client on boto3's standard credential chain; AWS_ENDPOINT_URL works without a flag."""
    import boto3
    from botocore.config import Config

    # Downloads skip botocore's CRC32 check: pull verifies every file's sha256, which is stronger.
    # Uploads keep it, so the store never accepts bytes that changed in transit.
    config = Config(max_pool_connections=settings.concurrency + 4, connect_timeout=5, read_timeout=60,
                    retries={"max_attempts": 3, "mode": "standard"}, response_checksum_validation="when_required")
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


@contextlib.contextmanager
def transfer_manager(client, settings: TransferSettings) -> Iterator:
    """An s3transfer manager for one batch of transfers: on the way out it joins its threads (so
    every subscriber's on_done has run), or, after an error or an interrupt, cancels what is left."""
    from boto3.s3.transfer import TransferConfig, create_transfer_manager

    config = TransferConfig(multipart_threshold=settings.part_size, multipart_chunksize=settings.part_size,
                            max_concurrency=settings.concurrency, preferred_transfer_client="classic")
    manager = create_transfer_manager(client, config)
    try:
        yield manager
    except BaseException:
        manager.shutdown(cancel=True)
        raise
    manager.shutdown()


_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
                     "ExpiredToken", "TokenRefreshRequired", "AuthorizationHeaderMalformed", "403", "Forbidden"}


def _root_cause(exc: BaseException) -> BaseException | None:
    """The botocore error behind s3transfer's wrappers (kept as context or last_exception), if any."""
    from botocore.exceptions import BotoCoreError, ClientError

    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (ClientError, BotoCoreError)):
            return cur
        cur = getattr(cur, "last_exception", None) or cur.__cause__ or cur.__context__
    return None


def error_code(exc: BaseException) -> str | None:
    from botocore.exceptions import ClientError

    cause = _root_cause(exc)
    return str(cause.response.get("Error", {}).get("Code")) if isinstance(cause, ClientError) else None


def storage_error(exc: BaseException, *, doing: str, location: S3Location, endpoint: str) -> StorageError:
    """One actionable line for a failed store operation. Never includes a secret."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    cause = _root_cause(exc) or exc
    if isinstance(cause, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(f"no usable credentials for {endpoint} while {doing} {location}: set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run on a host with an instance role")
    if isinstance(cause, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError,
                          ResponseStreamingError, ConnectionError, TimeoutError)):
        return StorageError(f"cannot reach the object store at {endpoint} while {doing} {location} "
                            f"({type(cause).__name__}): check --endpoint-url / AWS_ENDPOINT_URL and that "
                            "the store is up, then run the command again (a pull resumes)")
    if isinstance(cause, ClientError):
        code = str(cause.response.get("Error", {}).get("Code", "?"))
        if code == "NoSuchBucket":
            return StorageError(f"bucket {location.bucket!r} does not exist at {endpoint}: "
                                "create it or fix the URL")
        if code in _CREDENTIAL_CODES:
            return StorageError(f"the object store at {endpoint} refused the credentials ({code}) while {doing} "
                                f"{location}: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE "
                                "and the bucket's permissions")
        message = str(cause.response.get("Error", {}).get("Message", ""))[:200]
        return StorageError(f"the object store at {endpoint} answered {code} while {doing} {location}: {message}")
    return StorageError(f"object storage failed while {doing} {location}: {type(cause).__name__}: {cause}")


@contextlib.contextmanager
def translated_errors(doing: str, location: S3Location, client) -> Iterator[None]:
    """Turn boto errors into StorageError at this module's edge; ours pass through untouched."""
    from botocore.exceptions import BotoCoreError, ClientError

    endpoint = client.meta.endpoint_url
    try:
        yield
    except (StorageError, InvalidArgumentError):
        raise
    except (ClientError, BotoCoreError, ConnectionError, TimeoutError) as e:
        raise storage_error(e, doing=doing, location=location, endpoint=endpoint) from None
    except OSError as e:
        raise StorageError(f"local file error while {doing} {location}: {e}") from None
    except Exception as e:  # s3transfer wraps botocore errors in its own types
        if _root_cause(e) is not None or type(e).__module__.startswith(("s3transfer", "boto")):
            raise storage_error(e, doing=doing, location=location, endpoint=endpoint) from None
        raise


def _is_missing(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404")


def read_remote_index(client, loc: S3Location) -> tuple[bytes, str] | None:
    """(index bytes, its ETag), or None when the prefix holds no repository yet."""
    from botocore.exceptions import ClientError

    try:
        obj = client.get_object(Bucket=loc.bucket, Key=loc.index_key)
    except ClientError as e:
        if _is_missing(e):
            return None
        raise
    return obj["Body"].read(), obj.get("ETag", "")


def list_objects(client, loc: S3Location) -> dict[str, tuple[int, str]]:
    """{key: (size, etag)} of every object below the prefix."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=loc.list_prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = (obj["Size"], obj.get("ETag", ""))
    return out


# ---------------------------------------------------------------------------------- progress

class ProgressBar:
    """A transfer's progress (builder/progress.py: a bar on a terminal, plain lines otherwise;
    nothing when quiet) plus an optional callback; safe to call from transfer threads."""

    def __init__(self, total: int, desc: str, quiet: bool, callback: Progress | None):
        self.callback = callback
        self.bar = Transfer(total, desc) if not quiet and total > 0 else None

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar(n)
        if self.callback is not None:
            self.callback(n)

    def subscriber(self):
        from s3transfer.subscribers import BaseSubscriber

        bar = self

        class _Sub(BaseSubscriber):
            def on_progress(self, future, bytes_transferred, **kwargs):
                bar(bytes_transferred)

        return _Sub()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def rate(nbytes: int, seconds: float) -> float:
    return nbytes / MB / seconds if seconds > 0 else 0.0
