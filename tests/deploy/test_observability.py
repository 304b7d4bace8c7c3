"""Prometheus configs and rules (promtool), and the Grafana provisioning and dashboard:
every metric and label they query is one the code defines."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.deploy.declared import (
    exposed_series,
    metric_definitions,
    metric_definitions_in_source,
    promql_label_problems,
    promql_metric_names,
    without_grafana_variables,
)
from tests.deploy.files import GRAFANA_DIR, PROMETHEUS_DIR, run, tool

DASHBOARDS = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
RULES = PROMETHEUS_DIR / "rules.yml"


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every Prometheus target of every panel."""
    out = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                out.append((f"{path.name}: {panel['title']} {target['refId']}", target["expr"]))
    return out


def rule_queries() -> list[tuple[str, str]]:
    rules = yaml.safe_load(RULES.read_text())
    return [(f"rules.yml: {r.get('alert') or r.get('record')}", r["expr"])
            for group in rules["groups"] for r in group["rules"]]


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus-k8s.yml"])
def test_promtool_checks_the_config_and_its_rules(name):
    promtool = tool("promtool", "apt-get install prometheus")
    result = run([promtool, "check", "config", str(PROMETHEUS_DIR / name)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_promtool_unit_tests_of_the_alert_rules():
    promtool = tool("promtool", "apt-get install prometheus")
    result = run([promtool, "test", "rules", str(PROMETHEUS_DIR / "rules_test.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_dashboard_query_is_valid_promql(tmp_path):
    promtool = tool("promtool", "apt-get install prometheus")
    # promtool checks PromQL in rule files: each query becomes a recording rule.
    rules = [{"record": f"dashboard:query_{i}", "expr": without_grafana_variables(expr)}
             for i, (_, expr) in enumerate(dashboard_queries())]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout


def test_metric_scanner_reads_prometheus_client_calls_only():
    source = '''
from collections import Counter as Tally
from prometheus_client import Counter, Histogram
import prometheus_client as pc
a = Counter("jobs_total", "jobs", ["queue"])
b = Histogram("wait_seconds", "wait", labelnames=("queue", "kind"), namespace="moe")
c = pc.Gauge("depth", "d")
d = Tally("not_a_metric")
'''
    found = {m.name: (m.kind, m.labels) for m in metric_definitions_in_source(source)}
    assert found == {"jobs_total": ("Counter", ("queue",)), "moe_wait_seconds": ("Histogram", ("queue", "kind")),
                     "depth": ("Gauge", ())}
    counter = next(m for m in metric_definitions_in_source(source) if m.kind == "Counter")
    assert set(counter.series()) == {"jobs_total", "jobs_created"}
    collected = metric_definitions_in_source("from prometheus_client import ProcessCollector\nProcessCollector()\n")
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_max_fds"} <= \
        {m.name for m in collected}


def test_scanner_finds_what_the_metrics_classes_register():
    """The static scan must agree with the registries the services really build."""
    from services.expert.metrics import ExpertMetrics
    from services.router.metrics import RouterMetrics

    registered = {(family.name, family.type) for registry in (ExpertMetrics().registry, RouterMetrics().registry)
                  for family in registry.collect()}
    scanned = {(m.name.removesuffix("_total") if m.kind == "Counter" else m.name, m.kind.lower())
               for m in metric_definitions()
               if m.where.startswith(("services/expert/", "services/router/", "subnet/process_metrics.py"))}
    assert registered <= scanned


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_queried_metric_and_label_exists_in_the_code(source):
    queries = dashboard_queries() if source == "dashboard" else rule_queries()
    series = exposed_series()
    assert queries
    problems = []
    for where, expr in queries:
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        problems += [f"{where}: {name} is defined nowhere in services/ or subnet/" for name in names - set(series)]
        problems += [f"{where}: {p}" for p in promql_label_problems(expr, series)]
    assert problems == [], "\n".join(problems)


def test_promql_scanner_separates_metrics_from_functions_and_labels():
    expr = ('histogram_quantile(0.99, sum by (le, rpc) (rate(expert_rpc_latency_seconds_bucket{rpc="Forward"}'
            '[$__rate_interval]))) > 1e-3 and on (instance) up == 1')
    assert promql_metric_names(expr) == {"expert_rpc_latency_seconds_bucket", "up"}
    series = {"expert_rpc_latency_seconds_bucket": {"rpc", "le"}, "up": set()}
    assert promql_label_problems(expr, series) == []
    assert promql_label_problems('sum by (uid) (rate(expert_rpc_latency_seconds_bucket{code="OK"}[5m]))', series) \
        == ["expert_rpc_latency_seconds_bucket has no label 'code' (it has ['le', 'rpc'])",
            "grouping by 'uid', which none of ['expert_rpc_latency_seconds_bucket'] carries"]


def test_grafana_provisioning_points_the_dashboard_at_the_provisioned_datasource():
    datasources = yaml.safe_load((GRAFANA_DIR / "provisioning/datasources/datasources.yml").read_text())
    uids = {d["uid"]: d for d in datasources["datasources"]}
    assert uids["prometheus"]["type"] == "prometheus" and uids["prometheus"]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((GRAFANA_DIR / "provisioning/dashboards/dashboards.yml").read_text())["providers"]
    assert [p["options"]["path"] for p in providers] == ["/etc/grafana/dashboards"]
    assert DASHBOARDS, "deploy/grafana/dashboards/ holds no dashboard"
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] and dashboard["title"]
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"
        for panel in dashboard["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, f"{path.name}: {panel['title']} is wider than the grid"
            for ref in [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]:
                if ref is not None:
                    assert ref["uid"] in uids and ref["type"] == uids[ref["uid"]]["type"], panel["title"]


def test_dashboard_shows_what_the_issue_asks_for():
    panels = {p["title"]: p for path in DASHBOARDS for p in json.loads(path.read_text())["panels"]}
    exprs = {title: " ".join(t["expr"] for t in p.get("targets", [])) for title, p in panels.items()}

    def has(metric: str, kind: str | None = None) -> bool:
        return any(metric in e and (kind is None or panels[t]["type"] == kind) for t, e in exprs.items())

    assert has("router_tokens_per_second") and has("expert_tokens_total")                    # tokens/s
    assert has("expert_tokens_total", kind="heatmap")                                          # per-expert load
    assert any("histogram_quantile(0.5" in e and "histogram_quantile(0.99" in e and "rpc" in e
               for e in exprs.values())                                                        # p50/p99 per method
    assert has("router_masked_calls_total") and has("expert_queue_tokens")                    # masked, queues
    assert has("router_training_loss")                                                         # training loss
    assert has("router_round_phase") and has("expert_round_phase") and has("expert_round")     # rounds
    assert has("expert_checkpoints_published_total") and has("expert_commitments_total")
    assert has("router_checkpoints_published_total") and has("router_commitments_total")
    assert has("process_resident_memory_bytes") and has("process_memory_limit_bytes")          # memory vs limit
    assert has("process_open_fds") and has("process_cpu_seconds_total")
