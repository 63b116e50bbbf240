"""docker-compose.yml, checked offline (no Docker needed).

- the file validates against the compose spec (`check-jsonschema
  --builtin-schema vendor.compose-spec`, PyPI check-jsonschema);
- every `depends_on` names a service; every build context, bind-mounted file
  or directory exists in the repository; images are built here or pinned;
- every config file given to a service parses (YAML, JSON), and
  `llm-broker check-config` accepts the broker's config;
- the pieces agree: a worker pool per configured provider, Prometheus scrapes
  every llm-broker process on the port it serves metrics on and loads the
  rules, Grafana's datasource and dashboards are mounted where its
  provisioning looks, the load balancer reaches ingress.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tests.helpers import schema_errors

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
BROKER_CONFIG_TARGET = "/etc/llm-broker/config.yaml"
METRICS_PORT_DEFAULT_INGRESS = 8000


def _compose() -> dict[str, Any]:
    with COMPOSE.open(encoding="utf-8") as f:
        data: dict[str, Any] = yaml.safe_load(f)  # resolves the x-* anchors and merges
    return data


def _services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = _compose()["services"]
    return services


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else [str(c) for c in command]


def _option(command: list[str], name: str) -> list[str]:
    """Values of a repeatable `--name VALUE` option."""
    return [command[i + 1] for i, arg in enumerate(command[:-1]) if arg == name]


def _role(service: dict[str, Any]) -> str | None:
    """The llm-broker subcommand a service runs (image llm-broker, default entrypoint)."""
    if not str(service.get("image", "")).startswith("llm-broker") or "entrypoint" in service:
        return None
    command = _command(service)
    return command[0] if command else "ingress"


def _mounts(service: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(type, source, target) of each volume of a service: "bind" or "volume"."""
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            if len(parts) == 1:  # anonymous volume
                continue
            source, target = parts[0], parts[1]
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        else:
            kind, source, target = volume["type"], volume.get("source", ""), volume["target"]
        yield kind, source, target


def _bind_sources(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> repository path of each bind mount."""
    return {
        target: (ROOT / source).resolve()
        for kind, source, target in _mounts(service)
        if kind == "bind"
    }


def _host_path(service: dict[str, Any], container_path: str) -> Path | None:
    """The repository file a container path of a service comes from, if bind-mounted."""
    wanted = PurePosixPath(container_path)
    for target, source in _bind_sources(service).items():
        t = PurePosixPath(target)
        if wanted == t:
            return source
        if t in wanted.parents:
            return source / wanted.relative_to(t)
    return None


# ------------------------------------------------------------------- spec


def test_compose_file_matches_the_compose_spec() -> None:
    assert schema_errors("vendor.compose-spec", COMPOSE) is None


# ------------------------------------------------------------- references


def test_depends_on_names_services() -> None:
    services = _services()
    for name, service in services.items():
        depends = service.get("depends_on", [])
        for dep in depends:  # a list of names or a mapping name -> condition
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert dep != name


def test_builds_exist_and_images_are_built_or_pinned() -> None:
    services = _services()
    built = set()
    for name, service in services.items():
        if "build" not in service:
            continue
        build = service["build"]
        context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = (
            "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        )
        assert context.is_dir(), f"{name}: build context {context} missing"
        assert (context / dockerfile).is_file(), f"{name}: {context / dockerfile} missing"
        built.add(service.get("image"))
    for name, service in services.items():
        image = service.get("image")
        assert image or "build" in service, f"{name}: neither image nor build"
        if image is None or image in built:
            continue
        # Images pulled from a registry carry an explicit version tag.
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest", f"{name}: image {image} is not pinned to a version"


def test_bind_mounts_exist_and_named_volumes_are_declared() -> None:
    declared = set(_compose().get("volumes") or {})
    for name, service in _services().items():
        for kind, source, target in _mounts(service):
            assert target.startswith("/"), f"{name}: mount target {target} is not absolute"
            if kind == "bind":
                assert not source.startswith("/"), f"{name}: {source} is outside the repository"
                path = (ROOT / source).resolve()
                assert path.exists(), f"{name}: bind-mounted {source} does not exist"
                assert ROOT in path.parents, f"{name}: {source} is outside the repository"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def _mounted_files() -> Iterator[tuple[str, Path]]:
    for name, service in _services().items():
        for source in _bind_sources(service).values():
            files = (
                sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
            )
            for path in files:
                yield name, path


def test_mounted_config_files_parse() -> None:
    seen = 0
    for name, path in _mounted_files():
        text = path.read_text(encoding="utf-8")
        assert text.strip(), f"{name}: {path} is empty"
        if path.suffix in {".yml", ".yaml"}:
            docs = list(yaml.safe_load_all(text))
            assert docs and all(doc is not None for doc in docs), f"{name}: {path}"
            seen += 1
        elif path.suffix == ".json":
            json.loads(text)
            seen += 1
    assert seen >= 6  # broker config, prometheus.yml + rules, grafana provisioning + dashboard


def _nginx_conf() -> Path:
    (lb,) = [s for s in _services().values() if str(s.get("image", "")).startswith("nginx:")]
    conf = _host_path(lb, "/etc/nginx/conf.d/default.conf")
    assert conf is not None and conf.is_file()
    return conf


def test_nginx_config_is_accepted_by_nginx(tmp_path: Path) -> None:
    text = _nginx_conf().read_text(encoding="utf-8")
    assert text.count("{") == text.count("}")
    nginx = shutil.which("nginx")
    if nginx is None:
        pytest.skip("nginx is not on PATH: `nginx -t` not run (the structure is checked above)")
    # The file is included in the image's `http` block; paths point into tmp_path
    # so the check needs neither root nor /var/lib/nginx.
    main = tmp_path / "nginx.conf"
    temp = "\n".join(
        f"  {kind}_temp_path {tmp_path / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main.write_text(
        f"pid {tmp_path / 'nginx.pid'};\nerror_log stderr;\nevents {{}}\n"
        f"http {{\n{temp}\n  access_log off;\n  include {_nginx_conf()};\n}}\n",
        encoding="utf-8",
    )
    proc = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(main), "-e", "stderr"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------- broker config


def _broker_configs() -> dict[str, Path]:
    """Service name -> repository file mounted as the broker's config."""
    out = {}
    for name, service in _services().items():
        if _role(service) in {"ingress", "worker", "webhooks"}:
            assert _option(_command(service), "--config") == [BROKER_CONFIG_TARGET], name
            path = _host_path(service, BROKER_CONFIG_TARGET)
            assert path is not None, f"{name}: {BROKER_CONFIG_TARGET} is not mounted"
            out[name] = path
    return out


def _llm_broker() -> str:
    candidate = Path(sys.executable).with_name("llm-broker")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("llm-broker")
    assert found, "the llm-broker console script is not installed (pip install -e .)"
    return found


def test_llm_broker_check_config_accepts_the_compose_config() -> None:
    for path in set(_broker_configs().values()):
        proc = subprocess.run(
            [_llm_broker(), "check-config", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.startswith("config ok"), proc.stdout


def _broker_config() -> dict[str, Any]:
    (path,) = set(_broker_configs().values())
    with path.open(encoding="utf-8") as f:
        config: dict[str, Any] = yaml.safe_load(f)
    return config


def test_a_worker_pool_per_provider() -> None:
    providers = set(_broker_config()["providers"])
    assert len(providers) >= 2
    served: dict[str, str] = {}
    for name, service in _services().items():
        if _role(service) != "worker":
            continue
        command = _command(service)
        assert "--all" not in command, f"{name}: one pool per provider, not --all"
        for provider in _option(command, "--provider"):
            assert provider in providers, f"{name}: unknown provider {provider}"
            assert provider not in served, f"{provider} served by {served.get(provider)} too"
            served[provider] = name
    assert set(served) == providers


def _tenants(config: dict[str, Any]) -> set[str]:
    keys = (config.get("auth") or {}).get("keys") or []
    return {k["tenant"] for k in keys} or {"default"}  # open mode: one tenant, "default"


def test_the_gateway_is_open_only_by_saying_so() -> None:
    auth = _broker_config().get("auth") or {}
    # Ingress refuses to start with no keys unless the config opts in.
    assert auth.get("keys") or auth.get("open") is True


def test_each_tenant_has_its_own_webhook_secret() -> None:
    services = _services()
    webhooks = _broker_config()["webhooks"]
    # No shared secret: a tenant could sign events another tenant's receiver accepts.
    assert "secret_file" not in webhooks
    files = {
        t: PurePosixPath(webhooks["tenant_secret_files"][t]) for t in _tenants(_broker_config())
    }
    assert len(set(files.values())) == len(files)
    (maker,) = [n for n, s in services.items() if "webhook-secret" in " ".join(_command(s))]
    script = " ".join(_command(services[maker]))
    maker_volumes = {PurePosixPath(tgt): src for _, src, tgt in _mounts(services[maker])}
    for tenant, file in files.items():
        # The one-shot service writes the tenant's file into a named volume ...
        assert f"llm-broker webhook-secret > {file}" in script, tenant
        source = maker_volumes[file.parent]
        # ... that webhook delivery mounts read-only at the same path, after it ran.
        (delivery,) = [s for s in services.values() if _role(s) == "webhooks"]
        mounts = {(src, PurePosixPath(tgt)) for _, src, tgt in _mounts(delivery)}
        assert (source, file.parent) in mounts, tenant
        assert delivery["depends_on"][maker]["condition"] == "service_completed_successfully"
    # Nobody else reads the signing secrets.
    for name, service in services.items():
        if name != maker and _role(service) != "webhooks":
            assert source not in {src for _, src, _ in _mounts(service)}, name


# ----------------------------------------------------- stack and metrics


def test_redis_persists_with_aof_and_has_a_health_check() -> None:
    redis = _services()["redis"]
    command = " ".join(_command(redis))
    assert "--appendonly yes" in command
    assert any(target == "/data" for _, _, target in _mounts(redis))
    assert redis["healthcheck"]["test"]


def _published_host_ports(service: dict[str, Any]) -> list[str]:
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append(str(port.get("published", "")))
        else:
            parts = str(port).split(":")
            out.append(parts[-2] if len(parts) >= 2 else "")
    return out


def test_every_port_is_published_on_loopback_only() -> None:
    published = 0
    for name, service in _services().items():
        for port in service.get("ports", []):
            if isinstance(port, dict):
                host_ip = port.get("host_ip")
            else:
                parts = str(port).split(":")
                host_ip = parts[0] if len(parts) == 3 else None
            assert host_ip == "127.0.0.1", f"{name}: {port} is reachable from other machines"
            published += 1
    assert published >= 3  # the gateway, Prometheus, Grafana


def test_grafana_has_no_default_admin_password() -> None:
    services = _services()
    (name,) = [n for n, s in services.items() if str(s.get("image", "")).startswith("grafana/")]
    grafana = services[name]
    env = grafana.get("environment", {})
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env, "a password in the compose file is everyone's"
    assert str(env.get("GF_AUTH_ANONYMOUS_ENABLED", "false")).lower() == "false"
    password = PurePosixPath(env["GF_SECURITY_ADMIN_PASSWORD__FILE"])
    # Grafana reads the password from a volume that a one-shot service fills first.
    volume = next(src for _, src, tgt in _mounts(grafana) if PurePosixPath(tgt) == password.parent)
    (maker,) = [
        n
        for n, s in services.items()
        if n != name and volume in {src for kind, src, _ in _mounts(s) if kind == "volume"}
    ]
    assert grafana["depends_on"][maker]["condition"] == "service_completed_successfully"
    maker_dir = next(
        PurePosixPath(tgt) for _, src, tgt in _mounts(services[maker]) if src == volume
    )
    script = " ".join(_command(services[maker]))
    assert f"> {maker_dir / password.name}" in script
    assert "GRAFANA_ADMIN_PASSWORD" in script  # or the operator's own


def test_ingress_replicas_behind_the_load_balancer() -> None:
    services = _services()
    ingress = [n for n, s in services.items() if _role(s) == "ingress"]
    assert ingress == ["ingress"]
    assert services["ingress"]["deploy"]["replicas"] >= 2
    # Replicas cannot share a fixed host port: only the load balancer publishes 8000.
    assert not services["ingress"].get("ports")
    (lb_name,) = [n for n, s in services.items() if str(s.get("image", "")).startswith("nginx:")]
    lb = services[lb_name]
    assert _published_host_ports(lb) == ["8000"]
    assert services[lb_name]["depends_on"]["ingress"]["condition"] == "service_healthy"
    conf = _host_path(lb, "/etc/nginx/conf.d/default.conf")
    assert conf is not None
    text = conf.read_text(encoding="utf-8")
    assert re.search(r"\bhttp://ingress:8000\b", text)
    assert "listen 8000;" in text
    assert "proxy_buffering off;" in text  # SSE
    # No two services publish the same host port.
    published = [p for s in services.values() for p in _published_host_ports(s) if p]
    assert len(published) == len(set(published)), published


def _prometheus() -> tuple[dict[str, Any], dict[str, Any]]:
    services = _services()
    (name,) = [n for n, s in services.items() if str(s.get("image", "")).startswith("prom/")]
    service = services[name]
    command = _command(service)
    (config_file,) = [c.split("=", 1)[1] for c in command if c.startswith("--config.file=")]
    path = _host_path(service, config_file)
    assert path is not None and path.is_file(), f"{config_file} is not mounted"
    with path.open(encoding="utf-8") as f:
        config: dict[str, Any] = yaml.safe_load(f)
    # Rule files are resolved relative to the config file, inside the container.
    for rule_file in config["rule_files"]:
        rules = _host_path(service, str(PurePosixPath(config_file).parent / rule_file))
        assert rules is not None and rules.is_file(), f"rule file {rule_file} is not mounted"
    return service, config


def _scraped() -> dict[tuple[str, int], str]:
    """(compose service, port) -> scrape job, from dns_sd_configs and static targets."""
    _, config = _prometheus()
    out: dict[tuple[str, int], str] = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for name in sd["names"]:
                out[(name, int(sd["port"]))] = job["job_name"]
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                out[(host, int(port))] = job["job_name"]
    return out


def test_prometheus_scrapes_every_broker_process() -> None:
    services = _services()
    scraped = _scraped()
    config = _broker_config()
    ingress = config.get("ingress", {})
    ingress_port = int(
        ingress.get("metrics_port") or ingress.get("port", METRICS_PORT_DEFAULT_INGRESS)
    )
    expected = {}
    for name, service in services.items():
        role = _role(service)
        if role == "ingress":
            expected[(name, ingress_port)] = role
        elif role in {"worker", "webhooks"}:
            ports = _option(_command(service), "--metrics-port")
            assert len(ports) == 1, f"{name}: no --metrics-port, Prometheus cannot scrape it"
            expected[(name, int(ports[0]))] = role
    missing = set(expected) - set(scraped)
    assert not missing, f"not scraped: {sorted(missing)}"
    for (name, _port), job in scraped.items():
        assert name in services or name == "localhost", f"job {job} scrapes unknown {name}"
    # The alert LLMBrokerTargetDown watches jobs named llm-broker*.
    assert all(scraped[key].startswith("llm-broker") for key in expected)


def test_grafana_is_provisioned_from_the_repository() -> None:
    services = _services()
    (name,) = [n for n, s in services.items() if str(s.get("image", "")).startswith("grafana/")]
    grafana = services[name]
    datasources = _host_path(grafana, "/etc/grafana/provisioning/datasources")
    providers = _host_path(grafana, "/etc/grafana/provisioning/dashboards")
    assert datasources is not None and datasources.is_dir()
    assert providers is not None and providers.is_dir()

    prometheus_name = next(
        n for n, s in services.items() if str(s.get("image", "")).startswith("prom/")
    )
    uids = set()
    for path in sorted(datasources.glob("*.y*ml")):
        with path.open(encoding="utf-8") as f:
            for ds in yaml.safe_load(f)["datasources"]:
                assert ds["url"] == f"http://{prometheus_name}:9090", ds
                uids.add(ds["uid"])

    dashboards = 0
    for path in sorted(providers.glob("*.y*ml")):
        with path.open(encoding="utf-8") as f:
            for provider in yaml.safe_load(f)["providers"]:
                folder = _host_path(grafana, provider["options"]["path"])
                assert folder is not None and folder.is_dir(), provider
                for dashboard_file in sorted(folder.glob("*.json")):
                    dashboard = json.loads(dashboard_file.read_text(encoding="utf-8"))
                    dashboards += 1
                    for panel in dashboard["panels"]:
                        if "datasource" in panel:
                            assert panel["datasource"]["uid"] in uids, panel["title"]
    assert dashboards >= 1
    home = grafana.get("environment", {}).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        home_path = _host_path(grafana, home)
        assert home_path is not None and home_path.is_file()
