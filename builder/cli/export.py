"""`serverless-triton export kubernetes`: manifests that serve a repository in object storage on
Kubernetes (KServe + Knative, or plain Deployments + KEDA). See docs/kubernetes.md."""

from __future__ import annotations

from pathlib import Path

import click

from builder.cli.base import Command, Group
from builder.serve.kubernetes import MODES, export_kubernetes


@click.group(cls=Group)
def export() -> None:
    """Write deployment manifests for a repository in object storage."""


@export.command(cls=Command)
@click.argument("url", metavar="s3://BUCKET/PREFIX")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the Kustomize tree (base/, overlays/cpu, overlays/gpu).")
@click.option("--deployment", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Deployment file: [serving] allowed_ips and the [kubernetes] replicas and resources.")
@click.option("--mode", type=click.Choice(MODES), default="knative", show_default=True,
              help="knative: KServe InferenceServices (scale to zero); standard: Deployments + KEDA.")
@click.option("--gpu/--cpu", default=None,
              help="Which overlay the top kustomization.yaml selects [default: gpu if the repository holds "
                   "TensorRT engines].")
@click.option("--allowed-ip", "allowed_ips", multiple=True, metavar="IP|CIDR",
              help="Client address or block allowed in (loadBalancerSourceRanges); repeatable.")
@click.option("--public", is_flag=True, help="No API keys (no key Secret is mounted).")
@click.option("--endpoint-url", metavar="URL", help="S3-compatible endpoint (also the one the pods use).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def kubernetes(url, output, deployment, mode, gpu, allowed_ips, public, endpoint_url, quiet):
    """Push one repository per deployment beside s3://BUCKET/PREFIX and write Kustomize manifests.

    \b
    serverless-triton export kubernetes s3://models/prod -o k8s/
    kubectl apply -k k8s/        # after creating the Secrets the base names
    """
    report = export_kubernetes(url, output, deployment_file=deployment, mode=mode, gpu=gpu, public=public,
                               endpoint_url=endpoint_url, allowed_ips=tuple(allowed_ips), quiet=quiet,
                               echo=click.echo)
    click.echo(report.summary())
