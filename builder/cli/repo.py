"""`serverless-triton repo push | pull | refresh | verify`: a model repository in S3-compatible storage.

Credentials come from boto3's standard chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
instance roles, ...); `--endpoint-url` or AWS_ENDPOINT_URL points it at any S3-compatible store.
"""

from __future__ import annotations

from pathlib import Path

import click

from backends.contract.manifest import check_runtimes, read_manifest
from backends.errors import ServeError, StorageError
from builder.serve import storage

_endpoint_option = click.option(
    "--endpoint-url", metavar="URL", default=None,
    help="S3-compatible endpoint (MinIO, Ceph, R2, ...). Default: AWS_ENDPOINT_URL, else AWS S3.")
_quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars and no summary (for scripts).")


def _echo(quiet: bool, line: str) -> None:
    if not quiet:
        click.echo(line)


@click.group()
def repo() -> None:
    """Push, pull and refresh a model repository in S3-compatible object storage.

    \b
    serverless-triton repo push model_repository s3://models/prod
    serverless-triton repo pull s3://models/prod /srv/models
    serverless-triton repo refresh s3://models/prod /srv/models --server http://127.0.0.1:8000
    serverless-triton repo verify /srv/models
    """


@repo.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("url", metavar="s3://BUCKET/PREFIX")
@_endpoint_option
@click.option("--delete", is_flag=True,
              help="Afterwards delete objects under the prefix that the repository no longer has.")
@_quiet_option
def push(directory: Path, url: str, endpoint_url: str | None, delete: bool, quiet: bool) -> None:
    """Upload DIRECTORY to s3://BUCKET/PREFIX.

    Unchanged files (same sha256) are skipped; large files go up in parallel parts. The index
    (repository-index.json) is written last: readers never trust a half-pushed repository.
    """
    report = storage.push(directory, url, endpoint_url=endpoint_url, quiet=quiet, delete=delete)
    _echo(quiet, report.summary())


@repo.command()
@click.argument("url", metavar="s3://BUCKET/PREFIX")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@_endpoint_option
@_quiet_option
def pull(url: str, directory: Path, endpoint_url: str | None, quiet: bool) -> None:
    """Make DIRECTORY a verified copy of s3://BUCKET/PREFIX, swapped in atomically.

    Only files that differ are downloaded, each is checked against its sha256, and the new
    version replaces the old one in a single rename. If anything fails, DIRECTORY stays as it
    was; run the command again and it resumes.
    """
    report = storage.pull(url, directory, endpoint_url=endpoint_url, quiet=quiet)
    _echo(quiet, report.summary())
    check_runtimes(directory, read_manifest(directory))   # the runtime the manifest names is the one pulled


@repo.command()
@click.argument("url", metavar="s3://BUCKET/PREFIX")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--server", default="http://127.0.0.1:8000", show_default=True,
              help="HTTP address of the Triton that serves DIRECTORY.")
@_endpoint_option
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for each model load.")
@_quiet_option
def refresh(url: str, directory: Path, server: str, endpoint_url: str | None, timeout: float, quiet: bool) -> None:
    """Pull s3://BUCKET/PREFIX into the served DIRECTORY and reload only the models that changed.

    Changed models are loaded again (Triton keeps answering with the old version until the new
    one is ready), new ones are loaded, removed ones unloaded; other models are not touched.
    A running `serve --repository s3://...` does the same on SIGHUP.
    """
    report = storage.refresh(url, directory, server, endpoint_url=endpoint_url, quiet=quiet, timeout=timeout)
    _echo(quiet, report.summary())
    if report.failed:
        raise ServeError("models failed to load (their previous version keeps serving): "
                         + "; ".join(f"{m}: {r}" for m, r in report.failed.items()))


@repo.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_quiet_option
def verify(directory: Path, quiet: bool) -> None:
    """Re-hash every file of DIRECTORY against its repository-index.json (or manifest.json).

    Prints one line per file that differs (changed, missing, extra) and exits 1 if any does; the
    next `repo pull` downloads them again. Reads everything, trusts nothing: pull itself only
    re-hashes files whose stat changed since it wrote them.
    """
    report = storage.verify(directory)
    for line in report.lines():
        click.echo(line)
    if not report.ok:
        raise StorageError(report.summary())
    _echo(quiet, report.summary())
