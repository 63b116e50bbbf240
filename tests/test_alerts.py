"""Prometheus rules, their unit tests, the compose Prometheus config, and the
Grafana dashboard: checked offline.

The promtool tests need `promtool` on PATH (Debian: `apt-get install
prometheus`; `.ci/run` installs it) and are skipped without it. The other
tests read the files only.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources"

# The metric names the code exports (the contract with shared/metrics.py).
COUNTERS = {
    # ingress
    "llm_broker_requests_total",
    "llm_broker_cache_requests_total",
    "llm_broker_client_disconnects_total",
    "llm_broker_admission_rejections_total",
    "llm_broker_errors_total",
    "llm_broker_redis_errors_total",
    # worker
    "llm_broker_worker_jobs_total",
    "llm_broker_tokens_total",
    "llm_broker_cost_usd_total",
    "llm_broker_upstream_errors_total",
    "llm_broker_upstream_retries_total",
    "llm_broker_fallbacks_total",
    "llm_broker_upstream_aborted_total",
    # webhooks
    "llm_broker_webhook_deliveries_total",
}
GAUGES = {
    "llm_broker_active_requests",
    "llm_broker_upstream_in_flight",
    "llm_broker_circuit_state",
    "llm_broker_queue_depth",
    "llm_broker_queue_pending",
    "llm_broker_queue_lag",
    "llm_broker_queue_waiting",
    "llm_broker_queue_oldest_age_seconds",
    # ingress: budgets kept with the admin API
    "llm_broker_budget_spent_usd",
    "llm_broker_budget_usd",
    "llm_broker_budget_used_ratio",
    "llm_broker_budget_alert_fraction",
}
HISTOGRAMS = {
    "llm_broker_request_duration_seconds",
    "llm_broker_time_to_first_token_seconds",
    "llm_broker_redis_command_duration_seconds",
    "llm_broker_upstream_duration_seconds",
    "llm_broker_queue_wait_seconds",
}
CONTRACT = (
    COUNTERS
    | GAUGES
    | {f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_count", "_sum")}
)
# Gauges that every worker of a provider exports for the same stream.
PER_PROVIDER_GAUGES = {"llm_broker_queue_depth", "llm_broker_queue_pending", "llm_broker_queue_lag"}
# Series that are not llm-broker's: Prometheus's own and the blackbox exporter's.
EXTERNAL = {"up", "probe_ssl_earliest_cert_expiry"}

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "offset", "bool", "inf", "nan",
}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (good enough for our files)."""
    e = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables ($__rate_interval, $provider)
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', e)  # strings
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    names = re.findall(r"(?<![\w:.])([A-Za-z_:][\w:]*)\b(?!\s*\()", e)
    return {n for n in names if n.lower() not in _KEYWORDS}


def test_promql_metric_names_helper() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, provider) "
        '(rate(x_bucket{a="b(c)"}[$__rate_interval])))'
        " / on () group_left y:z offset 1h > bool 2e3 and max without (q) (w)"
    )
    assert promql_metric_names(expr) == {"x_bucket", "y:z", "w"}


def _load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def _rules() -> list[dict[str, Any]]:
    groups = _load_yaml(ALERTS)["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _recorded() -> set[str]:
    return {rule["record"] for rule in _rules() if "record" in rule}


def _alerts() -> list[dict[str, Any]]:
    return [rule for rule in _rules() if "alert" in rule]


# ---------------------------------------------------------------- promtool


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not on PATH (Debian: apt-get install prometheus)")
    return promtool


def _run_promtool(*args: str) -> None:
    # From the rules' directory: rule_files in alerts_test.yml and
    # prometheus.yml are relative paths.
    proc = subprocess.run(
        [_promtool(), *args],
        cwd=PROM_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"


def test_promtool_check_rules() -> None:
    _run_promtool("check", "rules", ALERTS.name)


def test_promtool_unit_tests() -> None:
    _run_promtool("test", "rules", ALERTS_TEST.name)


def test_promtool_check_config() -> None:
    _run_promtool("check", "config", PROM_CONFIG.name)


# ------------------------------------------------------------ rules, offline


def test_alerts_are_complete() -> None:
    names = [alert["alert"] for alert in _alerts()]
    assert len(names) == len(set(names)), names
    assert {
        "LLMBrokerHighErrorRate",
        "LLMBrokerHighLatencyP95",
        "LLMBrokerLowCacheHitRate",
        "LLMBrokerProviderErrorsRising",
        "LLMBrokerDailyCostOverBudget",
        "LLMBrokerCertificateExpiring",
        "LLMBrokerQueueBacklog",
    } <= set(names)
    groups = {group["name"]: group for group in _load_yaml(ALERTS)["groups"]}
    assert all("alert" in rule for rule in groups["llm-broker"]["rules"])
    for alert in _alerts():
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}, alert["alert"]
        assert alert["annotations"]["summary"].strip(), alert["alert"]
        assert alert["annotations"]["description"].strip(), alert["alert"]


def test_daily_budget_is_a_constant_in_its_own_group() -> None:
    groups = _load_yaml(ALERTS)["groups"]
    budget_groups = [
        group
        for group in groups
        if any(r.get("record") == "llm_broker:daily_cost_budget_usd" for r in group["rules"])
    ]
    assert len(budget_groups) == 1
    assert budget_groups[0]["rules"] == [
        {"record": "llm_broker:daily_cost_budget_usd", "expr": "vector(100)"}
    ]
    (cost,) = [a for a in _alerts() if a["alert"] == "LLMBrokerDailyCostOverBudget"]
    assert "llm_broker:daily_cost_budget_usd" in cost["expr"]
    assert "increase(llm_broker_cost_usd_total[1d])" in cost["expr"]


def test_rules_use_only_contract_metrics() -> None:
    allowed = CONTRACT | _recorded() | EXTERNAL
    for rule in _rules():
        unknown = promql_metric_names(rule["expr"]) - allowed
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: {unknown}"


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for test in _load_yaml(ALERTS_TEST)["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {alert["alert"] for alert in _alerts()}
    assert names - fires == set(), "alerts never shown firing"
    # A quiet case is an empty exp_alerts, or a firing case whose input also
    # has a healthy series that is absent from the expected alerts.
    per_series = {"LLMBrokerCertificateExpiring", "LLMBrokerTargetDown"}
    assert names - quiet - per_series == set(), "alerts never shown quiet on a healthy series"


def test_per_provider_gauges_are_never_summed() -> None:
    exprs = [rule["expr"] for rule in _rules()] + [expr for _, expr in _dashboard_exprs()]
    for expr in exprs:
        for gauge in PER_PROVIDER_GAUGES:
            if gauge in expr:
                assert re.search(rf"\bmax by \((namespace, )?provider\) \({gauge}\b", expr), expr
                assert not re.search(rf"\bsum\b[^()]*\(\s*{gauge}\b", expr), expr


# --------------------------------------------------------------- dashboard


def _dashboard_files() -> list[Path]:
    files = sorted(DASHBOARDS.glob("*.json"))
    assert files, f"no dashboard in {DASHBOARDS}"
    return files


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return out


def _dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable of every dashboard."""
    out: list[tuple[str, str]] = []
    for path in _dashboard_files():
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        for panel in _panels(dashboard):
            for target in panel.get("targets", []):
                out.append((f"{path.name}: {panel['title']}", target["expr"]))
        for var in dashboard.get("templating", {}).get("list", []):
            if var.get("type") != "query":
                continue
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\(\s*(.+?)\s*,\s*\w+\s*\)", query)
            out.append((f"{path.name}: ${var['name']}", m.group(1) if m else query))
    return out


def test_dashboard_is_valid_json_with_sane_panels() -> None:
    uids = {ds["uid"] for f in DATASOURCES.glob("*.yml") for ds in _load_yaml(f)["datasources"]}
    for path in _dashboard_files():
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        assert dashboard["uid"] and dashboard["title"]
        panels = _panels(dashboard)
        ids = [panel["id"] for panel in panels]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in panels:
            assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), panel["title"]
            if panel["type"] == "row":
                continue
            assert panel["targets"], panel["title"]
            # Every panel queries the provisioned Prometheus datasource.
            assert panel["datasource"]["uid"] in uids, panel["title"]
            for target in panel["targets"]:
                assert target["expr"].strip(), panel["title"]
                assert target["datasource"]["uid"] in uids, panel["title"]


def test_dashboard_uses_only_contract_metrics() -> None:
    allowed = CONTRACT | _recorded() | {"up"}
    for where, expr in _dashboard_exprs():
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert not names - allowed, f"{where}: unknown metrics {names - allowed}"


def test_dashboard_covers_the_operators_questions() -> None:
    used = {name for _, expr in _dashboard_exprs() for name in promql_metric_names(expr)}
    assert {
        "llm_broker_requests_total",  # request rate
        "llm_broker_request_duration_seconds_bucket",  # p50 / p95 / p99
        "llm_broker_errors_total",  # errors by type
        "llm_broker_tokens_total",
        "llm_broker_cost_usd_total",
        "llm_broker_cache_requests_total",  # hit rate
        "llm_broker_queue_depth",
        "llm_broker_upstream_in_flight",
        "llm_broker_upstream_retries_total",
        "llm_broker_fallbacks_total",
    } <= used
    exprs = " ".join(expr for _, expr in _dashboard_exprs())
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(llm_broker_request_duration" in exprs
