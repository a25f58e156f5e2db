"""deploy/grafana and deploy/prometheus name only metrics a real node exposes.

Every PromQL expression of the dashboard and of the alert rules is read, the metric names
in it are taken out, and each must be in the /metrics of a real node on a real Redis
(``up`` excepted: Prometheus adds it per target). With promtool on the PATH (Debian's
``prometheus`` package) the rules file and every dashboard query are also parsed by
Prometheus itself.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.node import Listener, NodeUnderTest, listen, node_settings
from tests.support.redis_server import RedisServer
from tests.support.timing import MS

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "relay-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "relay-alerts.yml"
PROMTOOL = shutil.which("promtool")
BUILTIN = {"up"}  # series Prometheus makes itself for each scraped target
# Grafana's variables, as a query run by Grafana would see them.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": "relay", "$instance": ".*"}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def dashboard_queries() -> list[str]:
    """Every ``expr`` of every panel (rows' panels included) and of the variables."""
    dash = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def panels(items: list[dict[str, Any]]) -> None:
        for panel in items:
            exprs.extend(t["expr"] for t in panel.get("targets", []))
            panels(panel.get("panels", []))

    panels(dash["panels"])
    for variable in dash["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            exprs.append(re.fullmatch(r"label_values\((.*), \w+\)", query)[1])  # type: ignore[index]
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, labels, keywords left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", text):
        word, call = match.groups()
        if not call and word.lower() not in _KEYWORDS:
            names.add(word)
    return names


def exposed_names(text: str) -> set[str]:
    """Every series name a scrape of this /metrics text can produce."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
        "gauge": ("",),
        "untyped": ("",),
    }
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def test_metric_names_reads_promql_as_prometheus_does() -> None:
    """The extractor finds the metrics, not the functions, labels, variables or keywords."""
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(relay_x_bucket{job=~"$job", le!="a b"}'
        "[$__rate_interval]))) > 0.25 and on (instance) up == 1 unless relay_y offset 5m"
    )
    assert metric_names(expr) == {"relay_x_bucket", "up", "relay_y"}


async def test_monitoring_files_name_only_metrics_a_real_node_exposes(
    redis_server: RedisServer,
    started_nodes: list[NodeUnderTest],
    listeners: list[Listener],
) -> None:
    """Every metric in the dashboard and the alert rules is in a real node's /metrics."""
    node = await NodeUnderTest(node_settings(redis_url=redis_server.url)).start()
    started_nodes.append(node)
    client = await listen(listeners, node.ws_url("watched"))
    await node.publish("watched", "e", {"n": 1})
    await client.wait_messages(1)
    async with aiohttp.ClientSession() as http, http.get(f"{node.base}/metrics") as response:
        exposed = exposed_names(await response.text())
    queries = dashboard_queries() + [rule["expr"] for rule in alert_rules()]
    named = set().union(*(metric_names(q) for q in queries))
    assert named - BUILTIN, "no metric found in the monitoring files"
    missing = named - BUILTIN - exposed
    assert missing == set(), f"not in /metrics: {sorted(missing)}"


def test_alert_rules_have_what_an_on_call_needs() -> None:
    """Each alert has a unique name, a severity, a summary; the dashboard's ids are unique."""
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)) and len(names) >= 5
    for rule in rules:
        assert rule["labels"]["severity"] in {"page", "warning", "info"}, rule
        assert rule["annotations"]["summary"], rule
    dash = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert all(
        t["datasource"]["uid"] == "${datasource}"
        for panel in dash["panels"]
        for t in panel.get("targets", [])
    )


@pytest.mark.skipif(PROMTOOL is None, reason="needs promtool (apt-get install prometheus)")
def test_monitoring_queries_parse_in_promtool(tmp_path: Path) -> None:
    """promtool accepts the alert rules, and every dashboard query as a recording rule."""
    assert PROMTOOL is not None
    check = [PROMTOOL, "check", "rules", str(ALERTS)]
    result = subprocess.run(check, capture_output=True, text=True, timeout=60_000 * MS)
    assert result.returncode == 0, result.stdout + result.stderr
    records = []
    for i, expr in enumerate(dashboard_queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        records.append({"record": f"relay:dashboard_query_{i}", "expr": expr})
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(rules)],
        capture_output=True,
        text=True,
        timeout=60_000 * MS,
    )
    assert result.returncode == 0, result.stdout + result.stderr
