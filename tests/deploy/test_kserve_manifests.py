"""deploy/kserve: manifests valid against KServe's and Kubernetes' schemas, offline and strictly,
naming our own runtime (never KServe's kserve-torchserve), and pointing at exactly the layout
scripts/build_mar.sh + scripts/kserve_layout.sh produce and the image our Dockerfile builds.

Schemas: the InferenceService and the (Cluster)ServingRuntime are checked against the models the
``kserve`` SDK generates from KServe's OpenAPI spec (``openapi_types`` / ``attribute_map``, read
from the installed files with ``ast``: importing ``kserve`` needs its whole server stack);
Kubernetes types inside them and core resources against ``kubernetes-validate``'s strict JSON
schemas. Unknown fields, wrong types and missing required fields fail, as ``kubectl apply
--validate=strict`` would.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml

from b4serve.ops.manage import Registration

ROOT = Path(__file__).resolve().parents[2]
KSERVE_DIR = ROOT / "deploy" / "kserve"
TEMPLATE = KSERVE_DIR / "config.properties"
K8S_VERSION = "1.33"
MODEL = "b4"
RUNTIME = "b4serve-torchserve"
# KServe mounts (or downloads) storageUri at /mnt/models; our runtime's args read the layout
# scripts/kserve_layout.sh writes there.
MOUNT = "/mnt/models"
CONFIG_PATH = "config/config.properties"
STORE_DIR = "model-store"
METRICS_PORT = 8082
# Where our image (Dockerfile) keeps the built v2 plugin and our log4j file.
IMAGE_HOME = "/opt/b4"
# Keys that mean the same on a laptop and in the cluster: the root config.properties is their home.
SHARED_KEYS = (
    "metrics_mode",
    "max_request_size",
    "decode_input_request",
    "allowed_urls",
    "install_py_dep_per_model",
    "async_logging",
    "default_response_timeout",
)
SNAPSHOT_KEYS = ("defaultVersion", "marName", "minWorkers", "maxWorkers", "batchSize")


# --- schema validation ------------------------------------------------------------------------


class SchemaError(Exception):
    """A manifest does not match its schema; the message names the field path."""


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locates without importing
    if spec is None or spec.origin is None:
        raise RuntimeError(
            f"{name} is not installed: scripts/bootstrap.sh --dev installs the test tools "
            "(kserve with --no-deps, from requirements-kserve-dev.txt)"
        )
    return Path(spec.origin).parent


def _class_tables(source: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each generated model class in ``source``: its name, types, JSON names, required fields."""
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        tables: dict[str, Any] = {}
        for statement in node.body:
            target = statement.targets[0] if isinstance(statement, ast.Assign) else None
            if isinstance(target, ast.Name) and target.id in ("openapi_types", "attribute_map"):
                tables[target.id] = ast.literal_eval(statement.value)
        if len(tables) == 2:
            # The generated setters refuse None for required fields with this exact message.
            tables["required"] = set(
                re.findall(r"Invalid value for `(\w+)`, must not be `None`", source)
            )
            yield node.name, tables


class Validator:
    """KServe models from the SDK; Kubernetes definitions from kubernetes-validate (strict)."""

    def __init__(self, k8s_version: str = K8S_VERSION) -> None:
        self.models: dict[str, dict[str, Any]] = {}
        for path in sorted((_package_dir("kserve") / "models").glob("v*.py")):
            self.models.update(_class_tables(path.read_text()))
        schemas = _package_dir("kubernetes_validate") / "kubernetes-json-schema"
        definitions = json.loads(
            (schemas / f"v{k8s_version}.0-local-strict" / "_definitions.json").read_text()
        )
        self.k8s_names = {_sdk_name(key): key for key in definitions["$defs"]}
        self.registry = referencing.Registry().with_resource(
            definitions["$id"], referencing.Resource.from_contents(definitions)
        )
        self.k8s_version = k8s_version

    def validate(self, manifest: dict[str, Any]) -> None:
        """Raise SchemaError unless ``manifest`` is valid for its apiVersion and kind."""
        group, _, version = str(manifest.get("apiVersion")).partition("/")
        if group == "serving.kserve.io":
            kind = manifest.get("kind", "?")
            type_name = f"{version[:1].upper()}{version[1:]}{kind}"  # V1beta1InferenceService
            if type_name not in self.models:
                raise SchemaError(f"{kind}: KServe's SDK has no {manifest['apiVersion']} {kind}")
            self.check(manifest, type_name, kind)
            return
        try:
            kubernetes_validate.validate(manifest, self.k8s_version, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as e:
            raise SchemaError(getattr(e, "message", str(e))) from e

    def check(self, value: Any, type_name: str, path: str) -> None:
        """Check ``value`` against an SDK type string: ``list[V1EnvVar]``, ``dict(str, str)``..."""
        if value is None:
            return
        if match := re.fullmatch(r"list\[(.+)\]", type_name):
            self._expect(isinstance(value, list), value, type_name, path)
            for index, item in enumerate(value):
                self.check(item, match.group(1), f"{path}[{index}]")
        elif match := re.fullmatch(r"dict\(str, (.+)\)", type_name):
            self._expect(isinstance(value, dict), value, type_name, path)
            for key, item in value.items():
                self.check(item, match.group(1), f"{path}.{key}")
        elif type_name in _PRIMITIVES:
            self._expect(_PRIMITIVES[type_name](value), value, type_name, path)
        elif type_name in self.models:
            self._check_model(value, self.models[type_name], path)
        elif type_name in self.k8s_names:
            self._check_k8s(value, self.k8s_names[type_name], path)
        else:
            raise SchemaError(f"{path}: no schema for type {type_name}")

    def _check_model(self, value: Any, model: dict[str, Any], path: str) -> None:
        self._expect(isinstance(value, dict), value, "object", path)
        by_json_name = {json_name: attr for attr, json_name in model["attribute_map"].items()}
        for key, item in value.items():
            if key not in by_json_name:
                raise SchemaError(f"{path}: unknown field {key!r}")
            self.check(item, model["openapi_types"][by_json_name[key]], f"{path}.{key}")
        for attr in model["required"]:
            if value.get(model["attribute_map"][attr]) is None:
                raise SchemaError(f"{path}: missing required field {model['attribute_map'][attr]}")

    def _check_k8s(self, value: Any, definition: str, path: str) -> None:
        schema = {"$ref": f"/api/_definitions.json#/$defs/{definition}"}
        resolver_schema = {"$id": "https://kubernetes.io/api/b4-check.json", **schema}
        validator = jsonschema.Draft202012Validator(resolver_schema, registry=self.registry)
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        if error is not None:
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.path)
            raise SchemaError(f"{path}{where}: {error.message}")

    @staticmethod
    def _expect(ok: bool, value: Any, type_name: str, path: str) -> None:
        if not ok:
            raise SchemaError(f"{path}: {value!r} is not of type {type_name}")


_PRIMITIVES = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "object": lambda v: True,
    "datetime": lambda v: isinstance(v, str),
    "date": lambda v: isinstance(v, str),
    # Kubernetes quantities: "4Gi", "500m" or a plain number.
    "ResourceQuantity": lambda v: isinstance(v, str | int | float) and not isinstance(v, bool),
}


def _sdk_name(definition: str) -> str:
    """The SDK's class name for a Kubernetes definition.

    ``io.k8s.api.core.v1.Container`` is ``V1Container``; other groups are spelled out:
    ``io.k8s.api.apps.v1.DeploymentStrategy`` is ``K8sIoApiAppsV1DeploymentStrategy``.
    """
    *_, version, kind = definition.split(".")
    if definition.startswith(("io.k8s.api.core.", "io.k8s.apimachinery.")):
        return version[0].upper() + version[1:] + kind
    parts = definition.split(".")
    parts[:2] = ["k8s", "io"]
    return "".join(part[0].upper() + part[1:] for part in parts)


@pytest.fixture(scope="module")
def validator() -> Validator:
    return Validator()


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """Every YAML document under deploy/kserve, named file#index."""
    found = []
    for path in sorted(KSERVE_DIR.glob("*.yaml")):
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            if document is not None:
                found.append((f"{path.name}#{index}", document))
    return found


RAW_DEPLOYMENT = "inferenceservice-raw.yaml"  # the InferenceService without Knative


def manifest(kind: str) -> dict[str, Any]:
    """The one manifest of ``kind`` (the InferenceService: the Knative one)."""
    (document,) = [doc for name, doc in manifests()
                   if doc["kind"] == kind and not name.startswith(RAW_DEPLOYMENT)]  # fmt: skip
    return document


def predictor_model() -> dict[str, Any]:
    return manifest("InferenceService")["spec"]["predictor"]["model"]


def runtime_container() -> dict[str, Any]:
    (container,) = manifest("ServingRuntime")["spec"]["containers"]
    return container


def flags(args: list[str]) -> dict[str, str]:
    """``--name=value`` arguments as a mapping (``--foreground`` and the like map to "")."""
    return dict(arg.partition("=")[::2] for arg in args if arg.startswith("--"))


# --- config.properties -----------------------------------------------------------------------


def read_properties(path: Path) -> dict[str, str]:
    """``key=value`` lines, as TorchServe and KServe's wrapper read them (comments skipped)."""
    properties = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            properties[key.strip()] = value.strip()
    return properties


def fill(template: str, mar: str, version: str) -> str:
    return template.replace("@MODEL@", MODEL).replace("@VERSION@", version).replace("@MAR@", mar)


def host_port(address: str) -> tuple[str, int]:
    match = re.fullmatch(r"http://([^:/]+):(\d+)", address)
    assert match, f"not an http://host:port address: {address}"
    return match.group(1), int(match.group(2))


# --- tests: schemas ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "document"), manifests(), ids=[n for n, _ in manifests()])
def test_every_manifest_is_valid_for_its_kind(
    validator: Validator, name: str, document: dict[str, Any]
) -> None:
    validator.validate(document)


def test_manifests_cover_runtimes_inference_service_volume_and_network_policy() -> None:
    kinds = sorted(doc["kind"] for _, doc in manifests())
    assert kinds == [
        "ClusterServingRuntime",
        "InferenceService",
        "InferenceService",  # RawDeployment: the drain is ours (preStop), not Knative's
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "ServingRuntime",
    ]


MUTATIONS = {
    "unknown predictor field": (("spec", "predictor"), "maxReplica", 4),
    "unknown model field": (("spec", "predictor", "model"), "storageUrl", "pvc://x"),
    "replicas as a string": (("spec", "predictor"), "minReplicas", "1"),
    "unknown field in a Kubernetes type": (
        ("spec", "predictor", "model", "resources"),
        "limit",
        {},
    ),
    "probe period as a string": (
        ("spec", "predictor", "model", "readinessProbe"),
        "periodSeconds",
        "ten",
    ),
    "env as a mapping": (("spec", "predictor", "model"), "env", {"OMP_NUM_THREADS": "2"}),
    "model format as a string": (("spec", "predictor", "model"), "modelFormat", "pytorch"),
}


@pytest.mark.parametrize("mutation", MUTATIONS, ids=list(MUTATIONS))
def test_broken_inference_service_is_rejected(validator: Validator, mutation: str) -> None:
    assert_rejected(validator, "InferenceService", *MUTATIONS[mutation])


def assert_rejected(
    validator: Validator, kind: str, keys: tuple[str | int, ...], field: str, value: object
) -> None:
    """``kind``'s manifest with ``field`` (under ``keys``) set to ``value`` fails, naming it."""
    broken = copy.deepcopy(manifest(kind))
    target = broken
    for key in keys:
        target = target[key]
    target[field] = value
    with pytest.raises(SchemaError, match=re.escape(field)):
        validator.validate(broken)


RUNTIME_MUTATIONS = {
    "unknown spec field": (("spec",), "supportedModelFormat", []),
    "unknown container field": (("spec", "containers", 0), "arguments", ["torchserve"]),
    "containers as a mapping": (("spec",), "containers", {"name": "kserve-container"}),
    "port as a string": (("spec", "containers", 0, "ports", 0), "containerPort", "8080"),
    "autoSelect as a string": (("spec", "supportedModelFormats", 0), "autoSelect", "false"),
    "protocol versions as a string": (("spec",), "protocolVersions", "v2"),
    "annotation value as a number": (("spec", "annotations"), "prometheus.kserve.io/port", 8082),
}


@pytest.mark.parametrize("kind", ["ServingRuntime", "ClusterServingRuntime"])
@pytest.mark.parametrize("mutation", RUNTIME_MUTATIONS, ids=list(RUNTIME_MUTATIONS))
def test_broken_runtime_is_rejected(validator: Validator, kind: str, mutation: str) -> None:
    assert_rejected(validator, kind, *RUNTIME_MUTATIONS[mutation])


@pytest.mark.parametrize("kind", ["ServingRuntime", "ClusterServingRuntime"])
def test_runtime_without_containers_or_of_an_unknown_version_is_rejected(
    validator: Validator, kind: str
) -> None:
    broken = copy.deepcopy(manifest(kind))
    del broken["spec"]["containers"]
    with pytest.raises(SchemaError, match="missing required field containers"):
        validator.validate(broken)
    with pytest.raises(SchemaError, match=re.escape("no serving.kserve.io/v1beta1")):
        validator.validate({**manifest(kind), "apiVersion": "serving.kserve.io/v1beta1"})


def test_inference_service_without_model_format_is_rejected(validator: Validator) -> None:
    broken = copy.deepcopy(manifest("InferenceService"))
    del broken["spec"]["predictor"]["model"]["modelFormat"]
    with pytest.raises(SchemaError, match="missing required field modelFormat"):
        validator.validate(broken)


@pytest.mark.parametrize(
    ("field", "value"), [("podSelectors", {}), ("policyTypes", "Ingress")], ids=["unknown", "type"]
)
def test_broken_network_policy_is_rejected(validator: Validator, field: str, value: Any) -> None:
    broken = copy.deepcopy(manifest("NetworkPolicy"))
    broken["spec"][field] = value
    with pytest.raises(SchemaError):
        validator.validate(broken)


# --- tests: what the manifests say -------------------------------------------------------------


def test_predictor_uses_our_runtime_never_kserves_torchserve() -> None:
    model = predictor_model()
    assert model["runtime"] == RUNTIME != "kserve-torchserve"
    assert "runtimeVersion" not in model  # the runtime's image is ours, not KServe's
    for kind in ("ServingRuntime", "ClusterServingRuntime"):
        runtime = manifest(kind)
        assert runtime["metadata"]["name"] == RUNTIME
        formats = runtime["spec"]["supportedModelFormats"]
        assert model["modelFormat"]["name"] in [f["name"] for f in formats]
        assert all(f["autoSelect"] is False for f in formats)  # other pytorch models keep theirs
        assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]


def test_cluster_runtime_is_the_namespaced_runtime_cluster_wide() -> None:
    assert manifest("ClusterServingRuntime")["spec"] == manifest("ServingRuntime")["spec"]


def test_runtime_serves_the_layout_with_our_plugin_on_the_v2_port() -> None:
    container = runtime_container()
    assert container["name"] == "kserve-container"  # where KServe merges the predictor's fields
    args = container["args"]
    assert args[0] == "torchserve" and "--foreground" in args  # the container's main process
    options = flags(args)
    assert options["--model-store"] == f"{MOUNT}/{STORE_DIR}"
    assert options["--ts-config"] == f"{MOUNT}/{CONFIG_PATH}"
    assert options["--plugins-path"] == f"{IMAGE_HOME}/plugins"
    assert options["--log-config"] == f"{IMAGE_HOME}/log4j.properties"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"B4_PLUGINS_DIR={IMAGE_HOME}/plugins" in dockerfile  # the image has it built there
    assert "COPY config.properties log4j.properties metrics.yaml ./" in dockerfile
    (port,) = container["ports"]
    config = read_properties(TEMPLATE)
    assert host_port(config["b4_v2_address"]) == ("0.0.0.0", port["containerPort"])
    assert port["name"] == "http1"  # Knative's name for an HTTP/1 serving port
    annotations = manifest("ServingRuntime")["spec"]["annotations"]
    assert int(annotations["prometheus.kserve.io/port"]) == METRICS_PORT
    assert container["resources"] == predictor_model()["resources"]  # the same pod either way


def test_probes_ask_the_v2_listener_for_model_b4_without_a_token() -> None:
    port = runtime_container()["ports"][0]["containerPort"]
    readiness = predictor_model()["readinessProbe"]["httpGet"]
    liveness = predictor_model()["livenessProbe"]["httpGet"]
    assert readiness == {"path": f"/v2/models/{MODEL}/ready", "port": port}
    assert liveness == {"path": "/v2/health/live", "port": port}
    assert read_properties(TEMPLATE)["disable_token_authorization"] == "true"


def test_resources_fit_b4_on_cpu_and_threads_follow_the_cpu_limit() -> None:
    model = predictor_model()
    limits, requests = model["resources"]["limits"], model["resources"]["requests"]
    assert limits == requests  # Guaranteed QoS
    assert limits["memory"] == "4Gi"
    assert "nvidia.com/gpu" not in limits
    env = {item["name"]: item["value"] for item in model["env"]}
    assert env["OMP_NUM_THREADS"] == limits["cpu"]


def test_autoscaling_keeps_a_warm_replica_and_scales_on_concurrency() -> None:
    predictor = manifest("InferenceService")["spec"]["predictor"]
    assert 1 <= predictor["minReplicas"] < predictor["maxReplicas"]
    assert predictor["scaleMetric"] == "concurrency"
    assert 0 < predictor["scaleTarget"] <= predictor["containerConcurrency"]
    assert predictor["enableServiceLinks"] is False  # no stray TS_* variables


def test_raw_deployment_drains_each_pod_before_it_stops() -> None:
    """Knative drains its pods itself (and refuses lifecycle hooks); a RawDeployment pod waits
    in preStop for what it holds, within a grace period above the response timeout."""
    (raw,) = [doc for name, doc in manifests() if name.startswith(RAW_DEPLOYMENT)]
    knative = manifest("InferenceService")
    assert knative["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"
    assert "lifecycle" not in knative["spec"]["predictor"]["model"]
    annotations = raw["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"
    predictor = raw["spec"]["predictor"]
    assert predictor["minReplicas"] >= 2  # one keeps serving while the other rolls
    response_timeout = int(read_properties(TEMPLATE)["default_response_timeout"])
    command = predictor["model"]["lifecycle"]["preStop"]["exec"]["command"]
    match = re.fullmatch(r"sleep (\d+)", command[-1])
    assert command[:2] == ["sh", "-c"] and match, command
    waits = int(match.group(1))
    assert waits >= response_timeout  # the longest request TorchServe lets run
    assert predictor["terminationGracePeriodSeconds"] > waits
    # the rest is the Knative manifest's: same model, runtime, storage, resources and probes
    for field in ("modelFormat", "runtime", "protocolVersion", "storageUri", "resources",
                  "readinessProbe", "livenessProbe", "env"):  # fmt: skip
        assert predictor["model"][field] == knative["spec"]["predictor"]["model"][field], field


def test_network_policy_opens_the_v2_and_metrics_ports_only() -> None:
    policy = manifest("NetworkPolicy")
    isvc = manifest("InferenceService")
    labels = policy["spec"]["podSelector"]["matchLabels"]
    assert labels == {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"]}
    ports = {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}
    assert {runtime_container()["ports"][0]["containerPort"], METRICS_PORT} <= ports
    config = read_properties(TEMPLATE)
    inside = {host_port(config[key])[1] for key in ("inference_address", "management_address")}
    assert not inside & ports  # TorchServe's own APIs never leave the pod


def test_storage_uri_is_a_version_directory_on_the_claim() -> None:
    claim = manifest("PersistentVolumeClaim")["metadata"]["name"]
    assert predictor_model()["storageUri"] == f"pvc://{claim}/{MODEL}/VERSION"


# --- tests: config.properties -----------------------------------------------------------------


def test_config_keeps_torchserve_inside_the_pod_and_serves_v2_without_an_envelope() -> None:
    config = read_properties(TEMPLATE)
    v2_port = runtime_container()["ports"][0]["containerPort"]
    for key in ("inference_address", "management_address"):
        host, port = host_port(config[key])
        assert host == "127.0.0.1" and port not in (v2_port, METRICS_PORT), key
    assert host_port(config["metrics_address"]) == ("0.0.0.0", METRICS_PORT)
    assert config["grpc_inference_address"] == config["grpc_management_address"] == "127.0.0.1"
    assert "service_envelope" not in config  # the handler reads v2 itself, batched
    # The image's TS_* and B4_V2_ADDRESS defaults (Dockerfile ENV) must not override this file.
    assert config["enable_envvars_config"] == "false"
    assert config["model_store"] == f"{MOUNT}/{STORE_DIR}"
    assert config["disable_token_authorization"] == "true"
    assert config["enable_model_api"] == "false"
    assert config["metrics_config"] == f"{MOUNT}/config/metrics.yaml"  # laid out beside it


def test_config_shares_the_servers_keys_with_the_root_config() -> None:
    ours, root = read_properties(TEMPLATE), read_properties(ROOT / "config.properties")
    assert {key: ours[key] for key in SHARED_KEYS} == {key: root[key] for key in SHARED_KEYS}


def test_snapshot_registers_b4_with_the_registration_defaults() -> None:
    config = read_properties(Path(TEMPLATE))
    snapshot = json.loads(fill(config["model_snapshot"], "b4-1.0.mar", "1.0"))
    assert snapshot["modelCount"] == len(snapshot["models"]) == 1
    entry = snapshot["models"][MODEL]["1.0"]
    assert all(key in entry for key in SNAPSHOT_KEYS)  # TorchServe reads these unconditionally
    defaults = Registration()
    assert entry["marName"] == "b4-1.0.mar"
    assert entry["defaultVersion"] is True
    assert entry["minWorkers"] == entry["maxWorkers"] == defaults.initial_workers
    assert entry["maxBatchDelay"] == defaults.max_batch_delay_ms
    assert entry["responseTimeout"] == defaults.response_timeout_s
    assert int(config["default_response_timeout"]) == defaults.response_timeout_s
    # No envelope: requests from many clients share batches, as on the local server.
    assert entry["batchSize"] == defaults.batch_size


# --- tests: the layout, from the real scripts ----------------------------------------------------


FAKE_PYTHON = """#!/bin/sh
# Stands in for the venv's python: export_torchscript.py writes a dummy model (the real export
# takes minutes); anything else runs the real interpreter.
case "$1" in
  */export_torchscript.py)
    while [ $# -gt 0 ]; do [ "$1" = --output ] && out="$2"; shift; done
    echo "not a real model" > "$out"; exit 0 ;;
esac
exec {python} "$@"
"""


@pytest.fixture
def layout_env(tmp_path: Path) -> dict[str, str]:
    """build_mar.sh with the real archiver and a fake export, all paths in ``tmp_path``."""
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    real_bin = Path(sys.executable).parent  # the venv running the tests
    python = venv / "python"
    python.write_text(FAKE_PYTHON.format(python=real_bin / "python"))
    python.chmod(0o755)
    (venv / "torch-model-archiver").symlink_to(real_bin / "torch-model-archiver")
    env = {key: value for key, value in os.environ.items() if not key.startswith("B4_")}
    env.update(
        VENV=str(tmp_path / "venv"),
        B4_MODEL_STORE=str(tmp_path / "store"),
        B4_CACHE_DIR=str(tmp_path / "cache"),
        B4_KSERVE_DIR=str(tmp_path / "kserve"),
    )
    (tmp_path / "checkpoint.pth").write_bytes(b"fake")
    return env


def run(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / "scripts" / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def build_and_lay_out(env: dict[str, str], version: str) -> Path:
    checkpoint = str(Path(env["B4_CACHE_DIR"]).parent / "checkpoint.pth")
    built = run("build_mar.sh", "--checkpoint", checkpoint, "--version", version, env=env)
    assert built.returncode == 0, built.stderr
    assert built.stdout.strip() == f"{MODEL}-{version}.mar"
    laid = run("kserve_layout.sh", env=env)  # no argument: the newest archive
    assert laid.returncode == 0, laid.stderr
    return Path(laid.stdout.strip())


def test_layout_is_what_the_manifests_and_runtime_expect(layout_env: dict[str, str]) -> None:
    out = build_and_lay_out(layout_env, "1.2.3")
    mar = f"{MODEL}-1.2.3.mar"
    # storageUri points at <claim>/b4/VERSION: the directory is named by the version.
    assert out == Path(layout_env["B4_KSERVE_DIR"]) / "1.2.3"
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [CONFIG_PATH, "config/metrics.yaml", f"{STORE_DIR}/{mar}"]
    assert (out / "config/metrics.yaml").read_bytes() == (ROOT / "metrics.yaml").read_bytes()

    config = read_properties(out / CONFIG_PATH)
    expected = read_properties(TEMPLATE)
    expected["model_snapshot"] = fill(expected["model_snapshot"], mar, "1.2.3")
    assert config == expected  # the template, filled in, and nothing else
    assert config["model_store"] == f"{MOUNT}/{STORE_DIR}"
    entry = json.loads(config["model_snapshot"])["models"][MODEL]["1.2.3"]
    assert (out / STORE_DIR / entry["marName"]).is_file()

    with zipfile.ZipFile(out / STORE_DIR / mar) as archive:
        manifest_model = json.loads(archive.read("MAR-INF/MANIFEST.json"))["model"]
        assert "handler.py" in archive.namelist()
        shipped = sorted(name for name in archive.namelist() if name.startswith("b4serve/"))
    core = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "b4serve" / "serving").glob("*.py"))
    assert shipped == ["b4serve/__init__.py", *core]  # the serving core alone: no ops/, no lab/
    assert manifest_model["modelName"] == MODEL
    assert manifest_model["modelVersion"] == "1.2.3"
    assert manifest_model["handler"] == "handler.py"
    probe_path = predictor_model()["readinessProbe"]["httpGet"]["path"]
    assert f"/models/{manifest_model['modelName']}/" in probe_path


def test_layout_refuses_an_archive_whose_manifest_disagrees(layout_env: dict[str, str]) -> None:
    out = build_and_lay_out(layout_env, "1.2.3")
    store = Path(layout_env["B4_MODEL_STORE"])
    (store / "b4-1.2.3.mar").rename(store / "b4-9.9.9.mar")
    refused = run("kserve_layout.sh", "b4-9.9.9.mar", env=layout_env)
    assert refused.returncode == 1
    assert "holds model b4 version 1.2.3, not b4 9.9.9" in refused.stderr
    assert not (out.parent / "9.9.9").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model.mar"], "archive name must be b4-<version>.mar"),
        (["b4-4.0.mar"], "archive not found"),
        ([], "no b4-*.mar in"),
        (["--bogus"], "unknown argument"),
    ],
)
def test_layout_fails_in_one_line_without_an_archive(
    layout_env: dict[str, str], args: list[str], message: str
) -> None:
    result = run("kserve_layout.sh", *args, env=layout_env)
    assert result.returncode == 1
    assert message in result.stderr
    assert not Path(layout_env["B4_KSERVE_DIR"]).exists()


def test_layout_answers_help() -> None:
    result = run("kserve_layout.sh", "--help", env=dict(os.environ))
    assert result.returncode == 0
    assert "Usage: scripts/kserve_layout.sh [MAR]" in result.stdout
