"""`serverless-triton export kubernetes`: a repository in object storage -> one repository per
deployment beside it, and a Kustomize base (plus cpu and gpu overlays) that serves each one.

Two modes:
  knative   KServe Serverless: one ServingRuntime (our image, `serverless-triton serve` on the files
            KServe's storage initializer puts in /mnt/models) and one InferenceService per
            deployment (`storageUri` its own repository; min/max replicas, `scaleMetric:
            concurrency`; 0 replicas = scale to zero through Knative).
  standard  plain Kubernetes: per deployment a Deployment (serve pulls its repository itself, with
            sha256 checks), a LoadBalancer Service and a KEDA ScaledObject on Triton's queue time.

Both: a ServiceAccount carrying KServe's S3 endpoint annotations and naming the S3 Secret, a
metrics Service and a ServiceMonitor. Secrets are references only (the user creates them, see
docs/kubernetes.md); no secret value is ever written.

Per-deployment repositories: `s3://B/P-deployments/<name>-<precision>/` holds exactly that
deployment's Triton models, its `_runtime/<digest>` and a manifest listing it alone, pushed with
storage.push (sha256 metadata, index last). They sit beside P, not under it, so `repo push --delete`
of P never deletes them. KServe's storage initializer skips empty objects and creates no empty
folders, so every empty folder gets a one-line `.keep` file (Triton needs the ensemble's `1/`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlparse

from backends.contract.manifest import MANIFEST_NAME, Manifest, check_runtimes, read_manifest, write_manifest
from backends.errors import InvalidArgumentError, SourceError
from builder import __version__
from builder.build.deployment import load_deployment_file
from builder.serve import storage
from builder.serve.proxy import parse_entries
from builder.serve.storage.index import walk_repository
from builder.templating import strict_environment

TEMPLATES = Path(__file__).resolve().parent / "templates"
MODES = ("knative", "standard")
GPU_TARGETS = ("tensorrt-llm", "tensorrt")

# What the image and the manifests agree on (docker/Dockerfile.cpu, docker/Dockerfile.gpu).
IMAGE = "serverless-triton"
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8080, 9000, 8002      # KServe's Triton convention; Triton's metrics
PUBLIC_HTTP_PORT, PUBLIC_GRPC_PORT = 8000, 8001             # the public Service (standard mode), as `serve`
MODEL_DIR = "/mnt/models"                                   # where KServe's storage initializer writes
STATE_DIR = "/var/lib/serverless-triton/serve"              # serve --state-dir: nginx, api-keys.json
CACHE_DIR = "/var/cache/serverless-triton"                  # XDG_CACHE_HOME: pulls, Triton's backends
KEYS_FILE = "api-keys.json"
ENV_PREFIX = "SERVERLESS_TRITON_SERVE_"                      # click's auto_envvar_prefix for `serve`
S3_SECRET = "serverless-triton-s3"
KEYS_SECRET = "serverless-triton-api-keys"
SERVICE_ACCOUNT = "serverless-triton"
RUNTIME_NAME = "serverless-triton"
HEALTH_READY, HEALTH_LIVE = "/v2/health/ready", "/v2/health/live"
GPU_NODE_LABEL = "nvidia.com/gpu.present"
KEEP_FILE = ".keep"
KEEP_TEXT = ("serverless-triton: KServe's storage initializer skips empty objects and creates no empty folders; "
             "this file keeps this folder (Triton needs an ensemble's empty version folder).\n")
_MAX_NAME = 45   # Knative appends "-predictor-00001" and more to an InferenceService's name (63 in all)


@dataclass(frozen=True)
class Scaling:
    """[kubernetes] in the deployment file, per deployment after overrides."""

    min_replicas: int = 0              # 0: scale to zero (Knative mode)
    max_replicas: int = 4
    target_concurrency: int | None = None   # in-flight requests per replica; None: the engine's batch size
    target_queue_ms: float = 50.0      # standard mode: KEDA adds replicas above this mean queue time
    timeout_s: int = 600               # the longest generation: request timeout and termination grace
    cpu: str = "4"
    memory: str = "8Gi"
    gpus: int = 1

    def check(self, where: str) -> Scaling:
        if self.min_replicas < 0 or self.max_replicas < 1 or self.min_replicas > self.max_replicas:
            raise InvalidArgumentError(f"{where}: replicas must satisfy 0 <= min_replicas <= max_replicas, "
                                       f"max_replicas >= 1 (got {self.min_replicas}..{self.max_replicas})")
        if self.target_concurrency is not None and self.target_concurrency < 1:
            raise InvalidArgumentError(f"{where}: target_concurrency must be at least 1")
        if self.target_queue_ms <= 0 or self.timeout_s < 1 or self.gpus < 1:
            raise InvalidArgumentError(f"{where}: target_queue_ms, timeout_s and gpus must be positive")
        return self


_SCALING_KEYS = set(Scaling.__dataclass_fields__)


def _scaling_from(table: dict, base: Scaling, where: str) -> Scaling:
    unknown = set(table) - _SCALING_KEYS
    if unknown:
        raise InvalidArgumentError(f"{where} has unknown keys {sorted(unknown)}: allowed are {sorted(_SCALING_KEYS)}")
    values = {k: (str(v) if k in ("cpu", "memory") else v) for k, v in table.items()}
    try:
        return replace(base, **values).check(where)
    except TypeError as e:
        raise InvalidArgumentError(f"{where}: {e}") from None


@dataclass(frozen=True)
class KubernetesSettings:
    default: Scaling = field(default_factory=Scaling)
    overrides: dict[str, Scaling] = field(default_factory=dict)   # by `name` or `name:precision`
    allowed_ips: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()

    def scaling(self, name: str, precision: str) -> Scaling:
        return self.overrides.get(f"{name}:{precision}") or self.overrides.get(name) or self.default


def load_settings(deployment_file: Path | None) -> KubernetesSettings:
    """The deployment file's [serving] rules and its [kubernetes] table:

        [kubernetes]
        min_replicas = 0        # default for every deployment; 0 = scale to zero (knative mode)
        max_replicas = 4
        [kubernetes.models."smollm2-135m-instruct:int8"]   # or just the name, for every precision
        min_replicas = 1
    """
    if deployment_file is None:
        return KubernetesSettings()
    _, serving = load_deployment_file(deployment_file)
    data = tomllib.loads(Path(deployment_file).read_text())
    table = dict(data.get("kubernetes") or {})
    models = table.pop("models", {}) or {}
    where = f"{deployment_file}: [kubernetes]"
    default = _scaling_from(table, Scaling(), where)
    overrides = {str(k): _scaling_from(v, default, f"{where} models.{k!r}") for k, v in models.items()}
    return KubernetesSettings(default, overrides, parse_entries(serving.allowed_ips),
                              parse_entries(serving.trusted_proxies, "trusted proxy"))


def resource_name(name: str, precision: str) -> str:
    """A Kubernetes name (DNS-1035 label, short enough for Knative's suffixes) for a deployment."""
    slug = re.sub(r"[^a-z0-9-]+", "-", f"{name}-{precision}".lower()).strip("-")
    if not slug[:1].isalpha():
        slug = "m-" + slug
    if len(slug) > _MAX_NAME:
        digest = hashlib.sha256(f"{name}:{precision}".encode()).hexdigest()[:6]
        slug = slug[:_MAX_NAME - 7].rstrip("-") + "-" + digest
    return slug


@dataclass(frozen=True)
class Deployment:
    """One deployment to serve: its user name, Kubernetes name, repository URL and scaling."""

    user_name: str
    name: str
    storage_uri: str       # ends with '/': KServe lists by prefix, so foo-int8 must not match foo-int8-x
    scaling: Scaling
    gpu: bool


@dataclass(frozen=True)
class Layout:
    mode: str = "knative"
    gpu: bool = False                  # which overlay DIR/kustomization.yaml selects
    public: bool = False               # no API keys
    s3_endpoint: str | None = None     # the endpoint pods use; None: AWS
    s3_region: str = "us-east-1"
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"
    version: str = __version__


def deployments_url(url: str) -> str:
    """Where the per-deployment repositories of `url` live: beside its prefix, never below it."""
    loc = storage.parse_url(url)
    prefix = f"{loc.prefix}-deployments" if loc.prefix else "serverless-triton-deployments"
    return f"s3://{loc.bucket}/{prefix}"


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def deployment_repository(repo: Path, manifest: Manifest, user_name: str, out: Path) -> Path:
    """Assemble `out` as a complete repository of one deployment: its Triton models, its runtime,
    a manifest listing it alone, and a `.keep` in every empty folder (files are hard links)."""
    entry = manifest.deployments[user_name]
    roots = tuple(f"{m}/" for m in entry.triton_models) + (entry.runtime.path + "/",)
    files, empty = walk_repository(repo)
    mine = [f for f in files if f.startswith(roots)]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for rel in mine:
        _link_or_copy(repo / rel, out / rel)
    for rel in (d for d in empty if f"{d}/".startswith(roots)):
        (out / rel).mkdir(parents=True, exist_ok=True)
        (out / rel / KEEP_FILE).write_text(KEEP_TEXT)
    missing = sorted(set(entry.files) - set(mine))
    if missing:
        raise SourceError(f"{user_name}: the manifest lists files outside its models and runtime ({missing[0]}"
                          f"{' ...' if len(missing) > 1 else ''}): rebuild the repository with build-engines")
    empty_files = sorted(rel for rel in mine if (out / rel).stat().st_size == 0)
    if empty_files:
        raise SourceError(f"{user_name}: {empty_files[0]} is an empty file, which KServe's storage initializer "
                          "skips: the served copy would lack it. Rebuild the repository with build-engines")
    write_manifest(out, Manifest(manifest.generator, {user_name: entry}))
    check_runtimes(out, read_manifest(out))
    return out


def _s3_annotations(endpoint: str | None, region: str) -> dict[str, str]:
    """KServe's S3 annotations (ServiceAccount): endpoint host[:port] and whether to use https."""
    if not endpoint:
        return {"serving.kserve.io/s3-endpoint": "s3.amazonaws.com", "serving.kserve.io/s3-usehttps": "1",
                "serving.kserve.io/s3-region": region}
    parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    if not parsed.hostname:
        raise InvalidArgumentError(f"S3 endpoint {endpoint!r} has no host: write e.g. https://s3.example.com")
    host = parsed.netloc.rsplit("@", 1)[-1]
    return {"serving.kserve.io/s3-endpoint": host,
            "serving.kserve.io/s3-usehttps": "1" if parsed.scheme == "https" else "0",
            "serving.kserve.io/s3-region": region}


def serve_environment(layout: Layout, repository: str, grace_s: int) -> list[tuple[str, str]]:
    """The `serve` options the container gets as environment variables (click's auto_envvar_prefix).
    `grace_s`: how long generations in flight may finish after SIGTERM (the deployment's timeout_s;
    the pod's termination grace period adds the preStop sleep and the stop of Triton)."""
    env = [("REPOSITORY", repository), ("HTTP_PORT", str(HTTP_PORT)), ("GRPC_PORT", str(GRPC_PORT)),
           ("GRACE", str(grace_s)),
           ("METRICS_PORT", str(METRICS_PORT)), ("PUBLIC_ADDRESSES", "0.0.0.0"), ("STATE_DIR", STATE_DIR),
           # serve's metrics endpoint on the pod address, for the ServiceMonitor (docs/monitoring.md).
           ("METRICS_ADDRESS", "0.0.0.0")]
    if layout.public:
        env.append(("PUBLIC", "1"))
    return [(ENV_PREFIX + k, v) for k, v in env] + [("XDG_CACHE_HOME", CACHE_DIR)]


@dataclass
class Rendered:
    """The files of the Kustomize tree, relative to DIR."""

    files: dict[str, str]

    def write(self, out: Path) -> list[Path]:
        written = []
        for rel, text in sorted(self.files.items()):
            path = Path(out) / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written.append(path)
        return written


def render(deployments: list[Deployment], layout: Layout, allowed_ips: tuple[str, ...] = (),
           trusted_proxies: tuple[str, ...] = (), source: str = "") -> Rendered:
    """The Kustomize base, the cpu and gpu overlays and (knative mode) the ingress patch. Pure."""
    if layout.mode not in MODES:
        raise InvalidArgumentError(f"unknown mode {layout.mode!r}: choose knative or standard")
    if not deployments:
        raise InvalidArgumentError("no deployment to export: the repository's manifest lists none")
    env = strict_environment(TEMPLATES)
    common = {
        "deployments": deployments, "layout": layout, "allowed_ips": list(allowed_ips), "trusted_proxies": list(trusted_proxies),
        "source": source, "image": IMAGE, "http_port": HTTP_PORT, "grpc_port": GRPC_PORT, "metrics_port": METRICS_PORT,
        "public_http_port": PUBLIC_HTTP_PORT, "public_grpc_port": PUBLIC_GRPC_PORT, "model_dir": MODEL_DIR,
        "state_dir": STATE_DIR, "cache_dir": CACHE_DIR, "keys_file": KEYS_FILE, "s3_secret": S3_SECRET,
        "keys_secret": KEYS_SECRET, "service_account": SERVICE_ACCOUNT, "runtime_name": RUNTIME_NAME,
        "health_ready": HEALTH_READY, "health_live": HEALTH_LIVE, "gpu_node_label": GPU_NODE_LABEL,
        "s3_annotations": _s3_annotations(layout.s3_endpoint, layout.s3_region), "serve_environment": serve_environment,
        "max_timeout": max(d.scaling.timeout_s for d in deployments),
    }
    names = {
        "base/kustomization.yaml": "kubernetes_base_kustomization.yaml.j2",
        "base/serviceaccount.yaml": "kubernetes_serviceaccount.yaml.j2",
        "base/monitoring.yaml": "kubernetes_monitoring.yaml.j2",
        "overlays/cpu/kustomization.yaml": "kubernetes_overlay_cpu.yaml.j2",
        "overlays/gpu/kustomization.yaml": "kubernetes_overlay_gpu.yaml.j2",
        "kustomization.yaml": "kubernetes_root_kustomization.yaml.j2",
    }
    if layout.mode == "knative":
        names["base/servingruntime.yaml"] = "kubernetes_servingruntime.yaml.j2"
        names["base/inferenceservices.yaml"] = "kubernetes_inferenceservices.yaml.j2"
        names["public-ingress-patch.yaml"] = "kubernetes_ingress_patch.yaml.j2"
    else:
        names["base/deployments.yaml"] = "kubernetes_deployments.yaml.j2"
    return Rendered({rel: env.get_template(t).render(**common) for rel, t in names.items()})


@dataclass
class ExportReport:
    out: Path
    deployments: list[Deployment]
    files: list[Path]

    def summary(self) -> str:
        lines = [(f"wrote {len(self.files)} files to {self.out} ({'gpu' if any(d.gpu for d in self.deployments) else 'cpu'}"
                 " overlay selected by its kustomization.yaml)")]
        lines += [f"  {d.user_name:<32} {d.name:<32} {d.storage_uri}" for d in self.deployments]
        return "\n".join(lines)


def export_kubernetes(url: str, out: Path, *, deployment_file: Path | None = None, mode: str = "knative",
                      gpu: bool | None = None, public: bool = False, endpoint_url: str | None = None,
                      allowed_ips: tuple[str, ...] = (), work_dir: Path | None = None, quiet: bool = False,
                      echo: Callable[[str], None] = print) -> ExportReport:
    """Pull `url`, push one repository per deployment beside it, write the Kustomize tree to `out`."""
    if mode not in MODES:
        raise InvalidArgumentError(f"unknown mode {mode!r}: choose knative or standard")
    settings = load_settings(deployment_file)
    rules = parse_entries([*settings.allowed_ips, *allowed_ips])
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    repo = storage.default_cache_dir(url, endpoint)
    report = storage.pull(url, repo, endpoint_url=endpoint_url, quiet=quiet)
    if not quiet:
        echo(report.summary())
    manifest = read_manifest(repo)
    if not manifest.deployments:
        raise SourceError(f"{url} holds no deployment (its manifest lists none): build and push one first")
    check_runtimes(repo, manifest)
    has_gpu = any(e.engine.get("target") in GPU_TARGETS for e in manifest.deployments.values())
    if gpu is False and has_gpu:
        raise InvalidArgumentError(f"{url} holds TensorRT engines, which need the GPU image: drop --cpu")
    base = deployments_url(url)
    work = Path(work_dir) if work_dir else repo.parent / f".{repo.name}.export"
    deployments = []
    for user_name, entry in sorted(manifest.deployments.items()):
        name = resource_name(entry.name, entry.precision)
        target = f"{base}/{name}/"
        local = deployment_repository(repo, manifest, user_name, work / name)
        pushed = storage.push(local, target.rstrip("/"), endpoint_url=endpoint_url, quiet=quiet, delete=True)
        if not quiet:
            echo(f"{user_name}: {pushed.summary()}")
        scaling = settings.scaling(entry.name, entry.precision)
        if scaling.target_concurrency is None:
            scaling = replace(scaling, target_concurrency=int(entry.engine.get("max_batch_size") or 1))
        if mode == "standard" and scaling.min_replicas == 0:
            echo(f"{user_name}: standard mode cannot scale to zero (KEDA sees no queue without a pod): "
                 "min_replicas 1; use --mode knative for scale to zero")
            scaling = replace(scaling, min_replicas=1)
        deployments.append(Deployment(user_name, name, target, scaling,
                                      entry.engine.get("target") in GPU_TARGETS))
    shutil.rmtree(work, ignore_errors=True)
    layout = Layout(mode=mode, gpu=has_gpu if gpu is None else gpu, public=public, s3_endpoint=endpoint)
    rendered = render(deployments, layout, rules, settings.trusted_proxies, source=url)
    return ExportReport(Path(out), deployments, rendered.write(Path(out)))


__all__ = [
    "MANIFEST_NAME",
    "MODES",
    "Deployment",
    "ExportReport",
    "KubernetesSettings",
    "Layout",
    "Rendered",
    "Scaling",
    "deployment_repository",
    "deployments_url",
    "export_kubernetes",
    "load_settings",
    "render",
    "resource_name",
    "serve_environment",
]
