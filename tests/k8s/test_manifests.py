"""The manifests under k8s/: every object validates against the kubernetes client's models, the
kustomize builds are what they claim, and the wiring agrees with the code it configures.

``build()`` below is a minimal kustomize (resources, namespace, commonLabels, images, patches:
strategic merge and JSON 6902), enough for k8s/base and k8s/overlays/example and strict about
anything else. When ``kubectl`` is installed, its ``kubectl kustomize`` must produce the same objects.

A built-in object is deserialized into its model (``ApiClient().__deserialize(data, "V1Deployment")``)
and serialized back; the models drop fields they do not know, so any difference is a field
Kubernetes would reject or silently ignore (a typo, a wrong nesting). Required fields and types are
checked by the models themselves. The two CRDs (KEDA ScaledObject, ServiceMonitor) get explicit checks.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from fastproxy.cli import build_parser
from statesync.informer import API_CALLS, CONCURRENCY_ANNOTATION

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
BASE = K8S / "base"
OVERLAY = K8S / "overlays" / "example"

# ---- a minimal kustomize --------------------------------------------------------------------------

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "commonLabels", "resources", "images", "patches"}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
    "PersistentVolume",
    "StorageClass",
}
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet")
_AFFINITY = [
    f"spec/template/spec/affinity/{kind}/{rule}"
    for kind in ("podAffinity", "podAntiAffinity")
    for rule in (
        "preferredDuringSchedulingIgnoredDuringExecution/podAffinityTerm/labelSelector/matchLabels",
        "requiredDuringSchedulingIgnoredDuringExecution/labelSelector/matchLabels",
    )
]
# kustomize's commonLabels field specs for the kinds used here: (kind, path, create missing maps)
LABEL_PATHS: list[tuple[str, str, bool]] = [
    ("Service", "spec/selector", True),
    *[(k, "spec/selector/matchLabels", True) for k in WORKLOADS],
    *[(k, "spec/template/metadata/labels", True) for k in WORKLOADS],
    *[(k, p, False) for k in ("Deployment", "StatefulSet") for p in _AFFINITY],
    *[
        (k, "spec/template/spec/topologySpreadConstraints/labelSelector/matchLabels", False)
        for k in ("Deployment", "StatefulSet")
    ],
    ("StatefulSet", "spec/volumeClaimTemplates/metadata/labels", False),  # only where the list exists
    ("PodDisruptionBudget", "spec/selector/matchLabels", False),
    ("NetworkPolicy", "spec/podSelector/matchLabels", False),
    ("NetworkPolicy", "spec/ingress/from/podSelector/matchLabels", False),
    ("NetworkPolicy", "spec/egress/to/podSelector/matchLabels", False),
]
# strategic merge: list items are matched by these keys (else the list is replaced)
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": ("containerPort", "port"),
    "imagePullSecrets": "name",
}


class KustomizeError(Exception):
    pass


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def build(directory: Path) -> list[dict[str, Any]]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - KUSTOMIZATION_FIELDS
    if unknown:
        raise KustomizeError(f"{directory}: this minimal kustomize does not implement {sorted(unknown)}")
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        objects += build(path) if path.is_dir() else load_yaml(path)
    for patch in spec.get("patches", []):
        _patch(objects, patch, directory)
    if spec.get("namespace"):
        for obj in objects:
            _set_namespace(obj, spec["namespace"])
    for key, value in (spec.get("commonLabels") or {}).items():
        for obj in objects:
            _walk_set(obj, "metadata/labels", key, value, create=True)
            for kind, path, create in LABEL_PATHS:
                if obj["kind"] == kind:
                    _walk_set(obj, path, key, value, create=create)
    for image in spec.get("images", []):
        for obj in objects:
            _set_image(obj, image)
    ids = [_id(o) for o in objects]
    if len(set(ids)) != len(ids):
        raise KustomizeError(f"{directory}: duplicate objects {sorted(i for i in ids if ids.count(i) > 1)}")
    return objects


def _id(obj: dict[str, Any]) -> tuple[str, str, str]:
    return (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])


def _walk_set(node: Any, path: str, key: str, value: str, *, create: bool) -> None:
    head, _, rest = path.partition("/")
    if isinstance(node, list):
        for item in node:
            _walk_set(item, path, key, value, create=create)
        return
    if not isinstance(node, dict):
        return
    if head not in node:
        if not create:
            return
        node[head] = {}
    if rest:
        _walk_set(node[head], rest, key, value, create=create)
    elif isinstance(node[head], dict):
        node[head][key] = value


def _set_namespace(obj: dict[str, Any], namespace: str) -> None:
    if obj["kind"] not in CLUSTER_SCOPED:
        obj["metadata"]["namespace"] = namespace
    if obj["kind"] in ("RoleBinding", "ClusterRoleBinding"):
        for subject in obj.get("subjects", []):
            if subject.get("kind") == "ServiceAccount" and subject.get("namespace") in (None, "default"):
                subject["namespace"] = namespace


def _containers(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    yield from pod.get("initContainers", [])
    yield from pod.get("containers", [])


def _set_image(obj: dict[str, Any], image: dict[str, str]) -> None:
    for container in _containers(obj):
        name, _, tag = container["image"].partition(":")
        if name == image["name"]:
            container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}".rstrip(":")


def _patch(objects: list[dict[str, Any]], patch: dict[str, Any], directory: Path) -> None:
    if set(patch) - {"path", "patch", "target"}:
        raise KustomizeError(f"unsupported patch fields {sorted(patch)}")
    body = (directory / patch["path"]).read_text() if "path" in patch else patch["patch"]
    parsed = yaml.safe_load(body)
    if isinstance(parsed, list):  # JSON 6902
        target = patch.get("target") or {}
        matched = [o for o in objects if _matches(o, target)]
        if not matched:
            raise KustomizeError(f"patch target {target} matches nothing")
        for obj in matched:
            for op in parsed:
                _json_patch(obj, op)
        return
    target = patch.get("target") or {"kind": parsed["kind"], "name": parsed["metadata"]["name"]}
    matched = [o for o in objects if _matches(o, target)]
    if not matched:
        raise KustomizeError(f"patch target {target} matches nothing")
    for obj in matched:
        _merge(obj, parsed)


def _matches(obj: dict[str, Any], target: dict[str, str]) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    have = {
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "group": group,
        "version": version,
        "namespace": obj["metadata"].get("namespace", ""),
    }
    if set(target) - set(have):
        raise KustomizeError(f"unsupported patch target fields {sorted(target)}")
    return all(have[k] == v for k, v in target.items())


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if isinstance(key, str) and key.startswith("$"):
            raise KustomizeError(f"strategic merge directive {key} not implemented")
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        elif isinstance(value, list) and isinstance(base.get(key), list) and key in MERGE_KEYS:
            keys = MERGE_KEYS[key] if isinstance(MERGE_KEYS[key], tuple) else (MERGE_KEYS[key],)
            for item in value:
                merge_key = next(k for k in keys if k in item)
                existing = next((b for b in base[key] if b.get(merge_key) == item[merge_key]), None)
                if existing is None:
                    base[key].append(copy.deepcopy(item))
                else:
                    _merge(existing, item)
        else:
            base[key] = copy.deepcopy(value)


def _json_patch(obj: dict[str, Any], op: dict[str, Any]) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
    parent: Any = obj
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    if op["op"] == "add":
        if isinstance(parent, list):
            parent.insert(len(parent) if last == "-" else int(last), op["value"])
        else:
            parent[last] = op["value"]
    elif op["op"] == "replace":
        if isinstance(parent, list):
            parent[int(last)] = op["value"]
        elif last not in parent:
            raise KustomizeError(f"replace of a missing path {op['path']}")
        else:
            parent[last] = op["value"]
    elif op["op"] == "remove":
        del parent[int(last) if isinstance(parent, list) else last]
    else:
        raise KustomizeError(f"JSON patch op {op['op']} not implemented")


# ---- validation against the kubernetes client's models ---------------------------------------------

_api = client.ApiClient()
CRDS = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "ServiceMonitor")}


def model_name(obj: dict[str, Any]) -> str:
    version = obj["apiVersion"].rpartition("/")[2]
    return version[0].upper() + version[1:] + obj["kind"]


def _prune(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _prune(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_prune(v) for v in value]
    return value


def _differences(given: Any, back: Any, path: str = "") -> list[str]:
    if isinstance(given, dict) and isinstance(back, dict):
        out = [f"{path}/{k}: not a field of the model" for k in given if k not in back]
        out += [f"{path}/{k}: appeared" for k in back if k not in given]
        for key in given.keys() & back.keys():
            out += _differences(given[key], back[key], f"{path}/{key}")
        return out
    if isinstance(given, list) and isinstance(back, list):
        if len(given) != len(back):
            return [f"{path}: {len(given)} items became {len(back)}"]
        return [
            d
            for i, (a, b) in enumerate(zip(given, back, strict=True))
            for d in _differences(a, b, f"{path}/{i}")
        ]
    if given != back or type(given) is not type(back):
        return [f"{path}: {given!r} became {back!r}"]
    return []


def round_trip(obj: dict[str, Any]) -> list[str]:
    """Deserialize into the model and back; every difference is a field the model lost or changed."""
    name = model_name(obj)
    assert hasattr(client.models, name), f"no model {name} for {obj['apiVersion']} {obj['kind']}"
    model = _api._ApiClient__deserialize(copy.deepcopy(obj), name)  # type: ignore[attr-defined]
    return _differences(_prune(obj), _api.sanitize_for_serialization(model))


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def overlay() -> list[dict[str, Any]]:
    return build(OVERLAY)


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return build(BASE)


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = find(objects, kind, name)
    return found


def pod_templates(objects: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(o, o["spec"]["template"]) for o in objects if o["kind"] in WORKLOADS]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---- the files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_validates(path: Path) -> None:
    docs = load_yaml(path)
    assert docs, f"{path} is empty"
    for obj in docs:
        if (obj["apiVersion"], obj["kind"]) in CRDS:
            continue  # checked below, on the built objects
        assert round_trip(obj) == [], f"{path}: {obj['kind']} {obj['metadata'].get('name')}"


def test_unknown_and_mistyped_fields_are_detected(overlay: list[dict[str, Any]]) -> None:
    router = copy.deepcopy(one(overlay, "Deployment", "fastproxy-router"))
    assert round_trip(router) == []
    router["spec"]["replica"] = 3  # a typo
    router["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/x"
    router["spec"]["template"]["spec"]["securityContext"]["capabilities"] = {"add": ["BPF"]}  # wrong level
    assert sorted(round_trip(router)) == [
        "/spec/replica: not a field of the model",
        "/spec/template/spec/containers/0/livenessProbe/httpGet/paht: not a field of the model",
        "/spec/template/spec/securityContext/capabilities: not a field of the model",
    ]
    broken = copy.deepcopy(one(overlay, "Deployment", "fastproxy-router"))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(Exception, match="replicas"):
        round_trip(broken)
    del broken["spec"]["replicas"], broken["spec"]["selector"]  # required
    with pytest.raises(Exception, match="selector"):
        round_trip(broken)


# ---- the builds ---------------------------------------------------------------------------------


@pytest.mark.parametrize("directory", [BASE, OVERLAY], ids=["base", "overlay"])
def test_build_validates(directory: Path) -> None:
    objects = build(directory)
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) not in CRDS:
            assert round_trip(obj) == [], _id(obj)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("directory", [BASE, OVERLAY], ids=["base", "overlay"])
def test_minimal_kustomize_agrees_with_kubectl(directory: Path) -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    theirs = {_id(o): o for o in yaml.safe_load_all(result.stdout) if o}
    ours = {_id(o): o for o in build(directory)}
    assert theirs.keys() == ours.keys()
    for key, obj in ours.items():
        assert obj == theirs[key], key


def test_minimal_kustomize_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(KustomizeError, match="namePrefix"):
        build(tmp_path)


def test_overlay_applies_namespace_labels_images_and_patches(overlay: list[dict[str, Any]]) -> None:
    for obj in overlay:
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == "example", _id(obj)
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"]["namespace"] == "inference", _id(obj)
    images = {c["image"] for o in overlay for c in _containers(o)}
    assert "ghcr.io/example/fastproxy:0.1.0" in images and "ghcr.io/example/fastproxy:0.1.0-agent" in images
    assert not {i for i in images if i.startswith("fastproxy")}, "an image the overlay did not pin"
    assert one(overlay, "Service", "fastproxy-router")["spec"]["type"] == "LoadBalancer"
    assert one(overlay, "HorizontalPodAutoscaler", "fastproxy-router")["spec"]["maxReplicas"] == 8
    (binding,) = find(overlay, "RoleBinding")
    assert binding["subjects"][0]["namespace"] == "inference"


def test_routes_load_and_name_the_deployed_revision(overlay: list[dict[str, Any]], tmp_path: Path) -> None:
    from fastproxy.config import load_routes_file

    path = tmp_path / "routes.yaml"
    path.write_text(one(overlay, "ConfigMap", "fastproxy-routes")["data"]["routes.yaml"])
    routes = load_routes_file(path).routes
    revisions = {r.revision for route in routes for r in route.revisions}
    deployed = {t["metadata"]["labels"].get("fastproxy.io/revision") for _, t in pod_templates(overlay)}
    assert revisions and revisions <= deployed
    writer = one(overlay, "Deployment", "fastproxy-writer")["spec"]["template"]["spec"]
    args = build_parser().parse_args(writer["containers"][0]["args"])
    mount = writer["containers"][0]["volumeMounts"][0]
    assert args.routes == f"{mount['mountPath']}/routes.yaml"
    assert writer["volumes"][0]["configMap"]["name"] == "fastproxy-routes"


# ---- wiring: the manifests agree with the code -----------------------------------------------------


def test_rbac_grants_exactly_what_the_informer_calls(overlay: list[dict[str, Any]]) -> None:
    roles = find(overlay, "Role") + find(overlay, "ClusterRole")
    assert len(roles) == 1
    granted: set[tuple[str, str, str]] = set()
    for rule in roles[0]["rules"]:
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs")
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard in {field}"
        granted |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert granted == API_CALLS
    (binding,) = find(overlay, "RoleBinding") + find(overlay, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == roles[0]["metadata"]["name"]
    (subject,) = binding["subjects"]
    users = [o for o, t in pod_templates(overlay) if t["spec"].get("serviceAccountName") == subject["name"]]
    assert [o["metadata"]["name"] for o in users] == ["fastproxy-writer"]
    writer = users[0]
    assert writer["spec"]["replicas"] == 2
    assert build_parser().parse_args(writer["spec"]["template"]["spec"]["containers"][0]["args"]).kubernetes
    for obj, template in pod_templates(overlay):  # nobody else gets an API token
        if obj is not writer:
            assert template["spec"].get("automountServiceAccountToken") is False, _id(obj)


def test_fastproxy_containers_use_real_flags(overlay: list[dict[str, Any]]) -> None:
    parser = build_parser()
    roles = set()
    for obj in overlay:
        for container in _containers(obj):
            if container["image"].startswith("ghcr.io/example/fastproxy"):
                parser.parse_args(container["args"])  # exits on an unknown flag or a bad value
                roles.add(container["args"][0])
    assert roles == {"router", "writer", "agent", "sidecar"}


def test_informer_flags_select_the_inference_service(overlay: list[dict[str, Any]]) -> None:
    writer = one(overlay, "Deployment", "fastproxy-writer")["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(writer["args"])
    service = one(overlay, "Service", "chat-v1")
    selector = dict(term.split("=", 1) for term in args.label_selector.split(","))
    assert selects(selector, service["metadata"]["labels"])  # its EndpointSlices carry these labels
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == args.endpoint_port]
    chat = one(overlay, "Deployment", "chat-v1")["spec"]["template"]
    assert selects(service["spec"]["selector"], chat["metadata"]["labels"])
    pod_selector = dict(term.split("=", 1) for term in args.pod_label_selector.split(","))
    assert selects(pod_selector, chat["metadata"]["labels"])
    (sidecar,) = [c for c in chat["spec"]["containers"] if c.get("args") == ["sidecar"]]
    (target,) = [p for p in sidecar["ports"] if p["name"] == port["targetPort"]]
    listen = {e["name"]: e.get("value") for e in sidecar["env"]}["FASTPROXY_SIDECAR_LISTEN"]
    assert listen.endswith(f":{target['containerPort']}")
    policy = one(overlay, "NetworkPolicy", "fastproxy-sidecars")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], chat["metadata"]["labels"])
    assert policy["spec"]["ingress"][0]["ports"][0]["port"] == target["containerPort"]
    assert any(e["name"] == "POD_NAMESPACE" for e in writer["env"])  # the informer's default namespace


def test_sidecar_env_is_what_the_sidecar_reads(overlay: list[dict[str, Any]]) -> None:
    source = (ROOT / "fastproxy" / "sidecar.py").read_text()
    read = set(re.findall(r'_env\("([A-Z_]+)"', source)) | set(
        re.findall(r'environ\.get\("([A-Z_]+)"', source)
    )
    chat = one(overlay, "Deployment", "chat-v1")["spec"]["template"]
    (sidecar,) = [c for c in chat["spec"]["containers"] if c.get("args") == ["sidecar"]]
    env = {e["name"]: e for e in sidecar["env"]}
    extra = {"FASTPROXY_VALKEY", "VALKEY_PASSWORD", "FASTPROXY_HEALTHCHECK_URL"}  # URL parts; the image
    assert set(env) - read <= extra, f"set but never read: {set(env) - read - extra}"
    downward = {
        n: e["valueFrom"]["fieldRef"]["fieldPath"]
        for n, e in env.items()
        if "fieldRef" in e.get("valueFrom", {})
    }
    assert downward["POD_UID"] == "metadata.uid"
    assert downward["POD_IP"] == "status.podIP"
    assert downward["POD_NAMESPACE"] == "metadata.namespace"
    label = re.fullmatch(r"metadata\.labels\['(.+)'\]", downward["FASTPROXY_REVISION"])
    assert label and chat["metadata"]["labels"][label.group(1)]
    # the sidecar's concurrency and the informer's come from the same annotation
    assert downward["FASTPROXY_CONCURRENCY"] == f"metadata.annotations['{CONCURRENCY_ANNOTATION}']"
    assert int(chat["metadata"]["annotations"][CONCURRENCY_ANNOTATION]) >= 1


def test_selectors_and_references_resolve(overlay: list[dict[str, Any]]) -> None:
    templates = pod_templates(overlay)
    for obj, template in templates:
        assert selects(obj["spec"]["selector"]["matchLabels"], template["metadata"]["labels"]), _id(obj)
    labels = [t["metadata"]["labels"] for _, t in templates]
    for service in find(overlay, "Service"):
        assert any(selects(service["spec"]["selector"], lab) for lab in labels), _id(service)
    for pdb in find(overlay, "PodDisruptionBudget"):
        assert any(selects(pdb["spec"]["selector"]["matchLabels"], lab) for lab in labels), _id(pdb)
    for policy in find(overlay, "NetworkPolicy"):
        assert any(selects(policy["spec"]["podSelector"]["matchLabels"], lab) for lab in labels), _id(policy)
        for rule in policy["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                if "podSelector" in peer:
                    assert any(selects(peer["podSelector"]["matchLabels"], lab) for lab in labels), _id(
                        policy
                    )
    # whoever talks to Valkey may reach it
    valkey_policy = one(overlay, "NetworkPolicy", "fastproxy-valkey")["spec"]["ingress"][0]["from"][0]
    for obj, template in templates:
        uses_valkey = any(
            e["name"] == "FASTPROXY_VALKEY" for c in template["spec"]["containers"] for e in c.get("env", [])
        )
        assert uses_valkey == selects(
            valkey_policy["podSelector"]["matchLabels"], template["metadata"]["labels"]
        ) or (obj["metadata"]["name"] == "valkey"), _id(obj)
    # every Secret / ConfigMap reference exists, with the key
    secrets = {s["metadata"]["name"]: s for s in find(overlay, "Secret")}
    for _, template in templates:
        for container in template["spec"]["containers"]:
            for e in container.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]]["stringData"]
        for volume in template["spec"].get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets
            if "configMap" in volume:
                one(overlay, "ConfigMap", volume["configMap"]["name"])


def test_node_agent_daemonset(overlay: list[dict[str, Any]]) -> None:
    (agent,) = find(overlay, "DaemonSet")
    pod = agent["spec"]["template"]["spec"]
    assert not pod.get("hostNetwork") and not pod.get("hostPID")
    (container,) = pod["containers"]
    assert container["args"][0] == "agent"
    security = container["securityContext"]
    assert set(security["capabilities"]["add"]) == {"BPF", "PERFMON"} and security["capabilities"][
        "drop"
    ] == ["ALL"]
    assert not security.get("privileged")
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert set(host_paths.values()) == {
        "/lib/modules",
        "/usr/src",
        "/sys/kernel/tracing",
        "/sys/kernel/debug",
    }
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    for name, path in host_paths.items():
        assert mounts[name]["readOnly"] is True and mounts[name]["mountPath"] == path
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_router_probes_hpa_and_pdb(overlay: list[dict[str, Any]]) -> None:
    router = one(overlay, "Deployment", "fastproxy-router")
    container = router["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert args.admin == ("0.0.0.0", ports["admin"]) and args.listen[1] == ports["http"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert router["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > args.grace_period
    hpa = one(overlay, "HorizontalPodAutoscaler", "fastproxy-router")["spec"]
    assert (
        hpa["scaleTargetRef"]["name"] == "fastproxy-router" and hpa["metrics"][0]["resource"]["name"] == "cpu"
    )
    assert "cpu" in container["resources"]["requests"]  # utilization needs a request
    one(overlay, "PodDisruptionBudget", "fastproxy-router")


def test_valkey_requires_a_password(overlay: list[dict[str, Any]]) -> None:
    valkey = one(overlay, "StatefulSet", "valkey")["spec"]["template"]["spec"]["containers"][0]
    assert valkey["args"][valkey["args"].index("--requirepass") + 1] == "$(VALKEY_PASSWORD)"
    assert {e["name"] for e in valkey["env"]} == {"VALKEY_PASSWORD"}
    for obj, template in pod_templates(overlay):
        for container in template["spec"]["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            if "FASTPROXY_VALKEY" in env:
                assert "$(VALKEY_PASSWORD)@" in env["FASTPROXY_VALKEY"]["value"], _id(obj)
                names = list(env)
                assert names.index("VALKEY_PASSWORD") < names.index("FASTPROXY_VALKEY")  # expansion order


# ---- the CRDs ------------------------------------------------------------------------------------


def _metric_names() -> set[str]:
    return set(re.findall(r'"(fastproxy_[a-z_]+)"', (ROOT / "fastproxy" / "metrics.py").read_text()))


def test_keda_scaled_object(overlay: list[dict[str, Any]]) -> None:
    (scaled,) = find(overlay, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["metadata"]["name"]
    spec = scaled["spec"]
    assert set(spec) <= {
        "scaleTargetRef",
        "minReplicaCount",
        "maxReplicaCount",
        "pollingInterval",
        "cooldownPeriod",
        "idleReplicaCount",
        "initialCooldownPeriod",
        "advanced",
        "fallback",
        "triggers",
    }
    target = spec["scaleTargetRef"]
    deployment = one(overlay, target.get("kind", "Deployment"), target["name"])
    revision = deployment["spec"]["template"]["metadata"]["labels"]["fastproxy.io/revision"]
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    client.models.V2HorizontalPodAutoscalerBehavior.from_dict(behavior)  # the HPA KEDA creates takes it
    triggers = spec["triggers"]
    assert triggers
    metrics = _metric_names()
    for trigger in triggers:
        assert trigger["type"] == "prometheus" and trigger.get("metricType", "AverageValue") in (
            "AverageValue",
            "Value",
        )
        meta = trigger["metadata"]
        assert meta["serverAddress"].startswith("http") and meta["query"]
        assert isinstance(meta["threshold"], str) and float(meta["threshold"]) > 0  # KEDA wants strings
        for name in re.findall(r"\b(fastproxy_[a-z_]+)", meta["query"]):
            assert name.removesuffix("_bucket") in metrics, name
    queries = [t["metadata"]["query"] for t in triggers]
    assert any(f'fastproxy_revision_demand{{revision="{revision}"}}' in q for q in queries)
    assert any("histogram_quantile" in q and "fastproxy_queue_wait_seconds_bucket" in q for q in queries)


def test_service_monitor(overlay: list[dict[str, Any]]) -> None:
    (monitor,) = find(overlay, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    services = [
        s
        for s in find(overlay, "Service")
        if selects(spec["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in services] == ["fastproxy-router-admin"]
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] in {p["name"] for p in services[0]["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    credentials = endpoint["authorization"]["credentials"]
    assert endpoint["authorization"]["type"] == "Bearer"
    assert credentials["key"] in one(overlay, "Secret", credentials["name"])["stringData"]
    # the router reads the same Secret for its admin token
    router = one(overlay, "Deployment", "fastproxy-router")["spec"]["template"]["spec"]
    assert {v["secret"]["secretName"] for v in router["volumes"] if "secret" in v} == {credentials["name"]}


# ---- the image -----------------------------------------------------------------------------------


def test_dockerfile_and_dockerignore() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", dockerfile, re.MULTILINE | re.IGNORECASE)
    assert stages[0][0].startswith("python:3.11-slim")
    names = [name for _, name in stages]
    assert "agent" in names and names[-1] != "agent", "the default (last) stage is the non-root image"
    last = dockerfile[dockerfile.rindex("\nFROM ") :]
    assert re.search(r"^USER\s+(?!root|0\b)\S+", last, re.MULTILINE)
    assert "HEALTHCHECK" in dockerfile and "/healthz" in dockerfile
    assert "pip wheel" in dockerfile or "python -m build" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git"} <= {line.strip("/") for line in ignored}
