"""`export kubernetes` output without a cluster or a store: every variant (knative | standard x cpu |
gpu) rendered with `kubectl kustomize`, built-in kinds validated with kubernetes-validate (strict),
custom resources against the published CRD schemas in tests/data/crds, and the policies: allowed IPs
as source ranges, no secret value anywhere, probes on the ports and paths serve really answers,
every env var a real `serve` option, the per-deployment repository holding exactly one deployment."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import click
import jsonschema
import kubernetes_validate
import pytest
import yaml

from backends.contract.manifest import (
    MANIFEST_NAME,
    DeploymentEntry,
    Manifest,
    RuntimeInfo,
    checksums,
    read_manifest,
    write_manifest,
)
from backends.errors import InvalidArgumentError
from builder.cli import main
from builder.serve import kubernetes as k8s

CRDS = Path(__file__).resolve().parents[1] / "data" / "crds"
K8S_VERSION = "1.33"          # the oldest Kubernetes current KServe supports (v1.33 schemas, strict)
KUBECTL = shutil.which("kubectl")
ALLOWED = ("203.0.113.0/24", "198.51.100.7", "2001:db8::/32")
SECRET_LOOKALIKES = re.compile(r"AKIA[0-9A-Z]{16}|st-[A-Za-z0-9_-]{40}|stringData|^data:", re.MULTILINE)   # AWS, our keys, Secrets
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")


def _deployments() -> list[k8s.Deployment]:
    return [
        k8s.Deployment("tiny-llama:fp32", "tiny-llama-fp32", "s3://models/prod-deployments/tiny-llama-fp32/",
                       k8s.Scaling(target_concurrency=2), False),
        k8s.Deployment("all-minilm-l6-v2:int8", "all-minilm-l6-v2-int8",
                       "s3://models/prod-deployments/all-minilm-l6-v2-int8/",
                       k8s.Scaling(min_replicas=1, max_replicas=8, target_concurrency=64), False),
    ]


VARIANTS = [(mode, overlay, public) for mode in k8s.MODES for overlay in ("cpu", "gpu") for public in (False, True)]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[tuple[str, str, bool], tuple[Path, list[dict]]]:
    """Every variant written and built with `kubectl kustomize` (once for the module)."""
    out = {}
    for mode, overlay, public in VARIANTS:
        root = tmp_path_factory.mktemp(f"{mode}-{overlay}-{public}")
        layout = k8s.Layout(mode=mode, gpu=overlay == "gpu", public=public, s3_endpoint="https://s3.example.com:9000")
        k8s.render(_deployments(), layout, ALLOWED, source="s3://models/prod").write(root)
        built = subprocess.run([KUBECTL, "kustomize", str(root / "overlays" / overlay)], capture_output=True,
                               text=True, timeout=60, check=False)
        assert built.returncode == 0, built.stderr
        out[(mode, overlay, public)] = (root, [d for d in yaml.safe_load_all(built.stdout) if d])
    return out


def _kinds(docs: list[dict]) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for d in docs:
        kinds.setdefault(d["kind"], []).append(d)
    return kinds


# -- schemas ---------------------------------------------------------------------------------------

def _strict(schema):
    """A CRD's structural schema as JSON Schema that refuses unknown fields (kubectl's strict mode)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.get("nullable"):
        out.pop("nullable")
        if "type" in out:
            out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _crd_schemas() -> dict[tuple[str, str], dict]:
    schemas = {}
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        schemas[(f"{crd['group']}/{crd['version']}", crd["kind"])] = _strict(crd["openAPIV3Schema"])
    return schemas


CRD_SCHEMAS = _crd_schemas()


def test_the_stored_crds_are_the_four_the_export_writes():
    assert set(CRD_SCHEMAS) == {("serving.kserve.io/v1beta1", "InferenceService"),
                                ("serving.kserve.io/v1alpha1", "ServingRuntime"),
                                ("keda.sh/v1alpha1", "ScaledObject"),
                                ("monitoring.coreos.com/v1", "ServiceMonitor")}
    readme = (CRDS / "README.md").read_text()
    for path in CRDS.glob("*.yaml"):
        assert path.name in readme and path.read_text().startswith("# ")   # source named in the file too


def test_the_crd_check_refuses_an_unknown_field():
    isvc = CRD_SCHEMAS[("serving.kserve.io/v1beta1", "InferenceService")]
    good = {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": {"name": "x"},
            "spec": {"predictor": {"minReplicas": 0, "model": {"modelFormat": {"name": "m"}, "storageUri": "s3://b/p/"}}}}
    jsonschema.validate(good, isvc)
    bad = json.loads(json.dumps(good))
    bad["spec"]["predictor"]["minReplica"] = 0
    with pytest.raises(jsonschema.ValidationError, match="minReplica"):
        jsonschema.validate(bad, isvc)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0]}-{v[1]}-{'public' if v[2] else 'keys'}")
def test_every_object_is_valid(rendered, variant):
    _, docs = rendered[variant]
    seen = set()
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        seen.add(doc["kind"])
        if key in CRD_SCHEMAS:
            jsonschema.validate(doc, CRD_SCHEMAS[key])
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    mode = variant[0]
    assert seen == ({"ServiceAccount", "Service", "ServiceMonitor", "ServingRuntime", "InferenceService"}
                    if mode == "knative" else
                    {"ServiceAccount", "Service", "ServiceMonitor", "Deployment", "ScaledObject"})


# -- policies --------------------------------------------------------------------------------------

def _containers(docs: list[dict]) -> list[dict]:
    kinds = _kinds(docs)
    return ([c for r in kinds.get("ServingRuntime", []) for c in r["spec"]["containers"]]
            + [c for d in kinds.get("Deployment", []) for c in d["spec"]["template"]["spec"]["containers"]])


def test_knative_scaling_comes_from_the_deployment_settings(rendered):
    isvcs = {i["metadata"]["name"]: i["spec"]["predictor"] for i in _kinds(rendered[("knative", "cpu", False)][1])["InferenceService"]}
    assert isvcs["tiny-llama-fp32"]["minReplicas"] == 0          # scale to zero through Knative
    want = {"minReplicas": 1, "maxReplicas": 8, "scaleMetric": "concurrency", "scaleTarget": 64}
    assert {k: isvcs["all-minilm-l6-v2-int8"][k] for k in want} == want
    for name, p in isvcs.items():
        assert p["model"]["storageUri"] == f"s3://models/prod-deployments/{name}/"   # its own prefix, '/'-ended
        assert p["model"]["runtime"] == k8s.RUNTIME_NAME and p["serviceAccountName"] == k8s.SERVICE_ACCOUNT
        assert p["timeout"] >= 300      # Knative's request timeout and drain time: long generations finish
    runtime = _kinds(rendered[("knative", "cpu", False)][1])["ServingRuntime"][0]["spec"]["containers"][0]
    grace = int({e["name"]: e.get("value") for e in runtime["env"]}["SERVERLESS_TRITON_SERVE_GRACE"])
    assert grace == max(p["timeout"] for p in isvcs.values())   # serve drains as long as Knative waits


def test_standard_mode_scales_on_tritons_queue_time(rendered):
    kinds = _kinds(rendered[("standard", "cpu", False)][1])
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s["spec"] for s in kinds["ScaledObject"]}
    assert set(scaled) == {d["metadata"]["name"] for d in kinds["Deployment"]}
    trigger = scaled["all-minilm-l6-v2-int8"]["triggers"][0]
    assert trigger["type"] == "prometheus" and "nv_inference_queue_duration_us" in trigger["metadata"]["query"]
    assert 'serverless_triton_deployment="all-minilm-l6-v2-int8"' in trigger["metadata"]["query"]
    assert scaled["all-minilm-l6-v2-int8"]["maxReplicaCount"] == 8
    monitor = kinds["ServiceMonitor"][0]["spec"]
    assert monitor["podTargetLabels"] == ["serverless-triton/deployment"]   # the label the query selects on
    for d in kinds["Deployment"]:
        spec = d["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] > 600        # the longest generation, plus the preStop wait
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        # serve lets generations in flight run that long after SIGTERM (its default, 30 s, cut them)
        grace = int(env["SERVERLESS_TRITON_SERVE_GRACE"])
        assert 600 <= grace <= spec["terminationGracePeriodSeconds"] - 10 - 10   # minus preStop and the stop
        assert env["SERVERLESS_TRITON_SERVE_REPOSITORY"] == f"s3://models/prod-deployments/{d['metadata']['name']}/"
        assert env["AWS_ENDPOINT_URL"] == "https://s3.example.com:9000"
        assert spec["containers"][0]["envFrom"] == [{"secretRef": {"name": k8s.S3_SECRET}}]


@pytest.mark.parametrize("mode", k8s.MODES)
def test_allowed_ips_are_the_public_services_source_ranges(rendered, mode):
    root, docs = rendered[(mode, "cpu", False)]
    want = ["203.0.113.0/24", "198.51.100.7/32", "2001:db8::/32"]
    if mode == "standard":
        public = [s for s in _kinds(docs)["Service"] if s["spec"].get("type") == "LoadBalancer"]
        assert len(public) == 2
        for s in public:
            assert s["spec"]["loadBalancerSourceRanges"] == want and s["spec"]["externalTrafficPolicy"] == "Local"
    else:   # the public Service is Knative's ingress: a patch for it, applied by the user
        patch = yaml.safe_load((root / "public-ingress-patch.yaml").read_text())
        assert patch["spec"]["loadBalancerSourceRanges"] == want
        kubernetes_validate.validate(patch, K8S_VERSION, strict=True)
    for doc in docs:   # no other Service is reachable from outside the cluster
        if doc["kind"] == "Service" and doc["spec"].get("type") == "LoadBalancer":
            assert doc["spec"]["loadBalancerSourceRanges"] == want


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_no_secret_value_in_any_manifest(rendered, variant):
    root, docs = rendered[variant]
    assert not [d for d in docs if d["kind"] == "Secret"]          # Secrets are created by the user
    texts = [p.read_text() for p in root.rglob("*.yaml")] + [yaml.safe_dump_all(docs)]
    for text in texts:
        assert not SECRET_LOOKALIKES.search(text)
    for c in _containers(docs):
        for e in c.get("env", []):   # credentials only by reference
            assert not any(w in e["name"] for w in ("SECRET", "ACCESS_KEY", "TOKEN", "PASSWORD")) or "valueFrom" in e
    sa = _kinds(docs)["ServiceAccount"][0]
    assert sa["secrets"] == [{"name": k8s.S3_SECRET}]
    assert sa["metadata"]["annotations"] == {"serving.kserve.io/s3-endpoint": "s3.example.com:9000",
                                             "serving.kserve.io/s3-usehttps": "1",
                                             "serving.kserve.io/s3-region": "us-east-1"}


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_api_keys_come_from_a_secret_unless_public(rendered, variant):
    _, docs = rendered[variant]
    public = variant[2]
    for c in _containers(docs):
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        env = {e["name"]: e.get("value") for e in c["env"]}
        state = env["SERVERLESS_TRITON_SERVE_STATE_DIR"]
        keys = mounts.get(f"{state}/api-keys.json")   # where the gateway's KeyStore reads them
        if public:
            assert keys is None and env["SERVERLESS_TRITON_SERVE_PUBLIC"] == "1"
        else:
            assert keys == {"name": "api-keys", "mountPath": f"{state}/api-keys.json", "subPath": "api-keys.json",
                            "readOnly": True} and "SERVERLESS_TRITON_SERVE_PUBLIC" not in env
            assert state in mounts   # the rest of the state directory stays writable (nginx.conf, logs)
    specs = [d.get("spec", {}) for d in docs]
    volumes = [v for s in specs for v in (s.get("volumes") or s.get("template", {}).get("spec", {}).get("volumes", []))]
    assert any(v.get("secret", {}).get("secretName") == k8s.KEYS_SECRET for v in volumes) == (not public)


def _serve_options() -> dict[str, click.Option]:
    return {p.name.upper(): p for p in main.commands["serve"].params if isinstance(p, click.Option)}


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_probes_and_env_point_at_what_serve_really_serves(rendered, variant):
    from builder.serve.proxy import ProxyLayout  # noqa: F401  (serve's nginx: /v2/health/* open, no key)

    _, docs = rendered[variant]
    options = _serve_options()
    for c in _containers(docs):
        assert c["args"] == ["serve"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        http = int(env["SERVERLESS_TRITON_SERVE_HTTP_PORT"])
        assert http == k8s.HTTP_PORT == c["ports"][0]["containerPort"]
        for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live"),
                            ("startupProbe", "/v2/health/live")):
            assert c[probe]["httpGet"] == {"path": path, "port": http}
        unknown = {k for k in env if k.startswith(k8s.ENV_PREFIX)} - {k8s.ENV_PREFIX + o for o in options}
        assert not unknown, f"env vars serve has no option for: {sorted(unknown)}"
        if variant[0] == "standard":
            assert {p["containerPort"] for p in c["ports"]} == {k8s.HTTP_PORT, k8s.GRPC_PORT, k8s.METRICS_PORT}
    metrics = next(s for s in _kinds(docs)["Service"] if s["metadata"]["name"] == "serverless-triton-metrics")
    assert metrics["spec"]["ports"][0]["targetPort"] == int(
        {e["name"]: e.get("value") for e in _containers(docs)[0]["env"]}["SERVERLESS_TRITON_SERVE_METRICS_PORT"])


def test_gpu_overlay_asks_for_a_gpu_on_gpu_nodes_with_the_gpu_image(rendered):
    for mode in k8s.MODES:
        cpu, gpu = rendered[(mode, "cpu", False)][1], rendered[(mode, "gpu", False)][1]
        for c in _containers(gpu):
            assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and c["image"].endswith("-gpu")
        for c in _containers(cpu):
            assert "nvidia.com/gpu" not in c["resources"]["limits"] and c["image"].endswith("-cpu")
        pods = [r["spec"] for r in _kinds(gpu).get("ServingRuntime", [])] + \
               [d["spec"]["template"]["spec"] for d in _kinds(gpu).get("Deployment", [])]
        assert pods and all(p["nodeSelector"] == {k8s.GPU_NODE_LABEL: "true"} for p in pods)


def test_the_root_kustomization_selects_the_overlay(rendered):
    assert "overlays/gpu" in (rendered[("knative", "gpu", False)][0] / "kustomization.yaml").read_text()
    assert "overlays/cpu" in (rendered[("knative", "cpu", False)][0] / "kustomization.yaml").read_text()


# -- settings and names ----------------------------------------------------------------------------

def test_deployment_file_scaling_and_overrides(tmp_path):
    f = tmp_path / "deployment.toml"
    f.write_text('[serving]\nallowed_ips = ["10.0.0.0/8"]\n\n[[models]]\nname = "tiny"\nprecisions = ["int8"]\n\n'
                 '[kubernetes]\nmin_replicas = 0\nmax_replicas = 3\n\n[kubernetes.models."tiny:int8"]\nmin_replicas = 2\n')
    settings = k8s.load_settings(f)
    assert settings.allowed_ips == ("10.0.0.0/8",)
    assert settings.scaling("tiny", "int8") == k8s.Scaling(min_replicas=2, max_replicas=3)
    assert settings.scaling("tiny", "fp16") == k8s.Scaling(min_replicas=0, max_replicas=3)
    f.write_text('[[models]]\nname = "tiny"\n\n[kubernetes]\nmin_replica = 1\n')
    with pytest.raises(InvalidArgumentError, match="unknown keys \\['min_replica'\\]"):
        k8s.load_settings(f)
    f.write_text('[[models]]\nname = "tiny"\n\n[kubernetes]\nmin_replicas = 5\nmax_replicas = 2\n')
    with pytest.raises(InvalidArgumentError, match="0 <= min_replicas <= max_replicas"):
        k8s.load_settings(f)


def test_resource_names_are_dns_labels_short_enough_for_knative():
    assert k8s.resource_name("smollm2-135m-instruct", "int8") == "smollm2-135m-instruct-int8"
    assert k8s.resource_name("1b.model_x", "fp16") == "m-1b-model-x-fp16"
    long = k8s.resource_name("a" * 63, "fp16")
    assert len(long) <= 45 and long != k8s.resource_name("a" * 62 + "b", "fp16")


def test_per_deployment_repositories_sit_beside_the_prefix():
    assert k8s.deployments_url("s3://models/prod") == "s3://models/prod-deployments"
    assert k8s.deployments_url("s3://models") == "s3://models/serverless-triton-deployments"


def _fake_repository(root: Path) -> Manifest:
    """Two deployments sharing a runtime, each with an ensemble whose version folder is empty."""
    runtime = "_runtime/0123456789abcdef"
    (root / runtime / "backends").mkdir(parents=True)
    (root / runtime / "backends" / "__init__.py").write_text("# runtime\n")
    manifest = Manifest("serverless-triton test")
    for name in ("a", "b"):
        for model in (f"{name}-int8", f"{name}-int8-engine"):
            (root / model / "1").mkdir(parents=True)
            (root / model / "config.pbtxt").write_text(f'name: "{model}"\n')
        (root / f"{name}-int8-engine" / "1" / "model.py").write_text("# pointer\n")
        files = {**checksums(root, root / f"{name}-int8"), **checksums(root, root / f"{name}-int8-engine"),
                 **checksums(root, root / runtime)}
        manifest.deployments[f"{name}:int8"] = DeploymentEntry(
            name, "int8", "llm", "default", [f"{name}-int8", f"{name}-int8-engine"],
            {"infer": f"{name}-int8"}, {"target": "cpu", "max_batch_size": 4}, {},
            RuntimeInfo("0123456789abcdef" * 4, runtime, "serverless-triton test"), files=files)
    write_manifest(root, manifest)
    return manifest


def test_a_deployment_repository_holds_exactly_that_deployment(tmp_path):
    repo = tmp_path / "repo"
    manifest = _fake_repository(repo)
    out = k8s.deployment_repository(repo, manifest, "a:int8", tmp_path / "a")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted([MANIFEST_NAME, "_runtime/0123456789abcdef/backends/__init__.py", "a-int8/1/.keep",
                            "a-int8/config.pbtxt", "a-int8-engine/1/model.py", "a-int8-engine/config.pbtxt"])
    assert list(read_manifest(out).deployments) == ["a:int8"]
    assert (out / "a-int8" / "1" / ".keep").stat().st_size > 0   # KServe skips empty objects
