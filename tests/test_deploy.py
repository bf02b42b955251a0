"""Deploy artefacts: dashboard and alert queries name only exported metrics, promtool passes the rules and
their unit tests, the compose file validates, and the Dockerfile's healthcheck really tracks liveness.

promtool comes from Debian's `prometheus` package and docker-compose from `docker-compose`; under CI=true a
missing tool fails the test, locally it skips with the install command.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from hl_monitor.config import HttpConfig
from hl_monitor.metrics import Metrics
from hl_monitor.ops.http import HttpServer, Readiness, create_app
from hl_monitor.ops.positions import export_gauges, level_label
from hl_monitor.tracking.risk import DEFAULT_ALERT_LEVELS

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS = REPO / "deploy" / "prometheus"
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "hl-monitor.json"
ALERTS = PROMETHEUS / "alerts.yml"
RULE_TESTS = PROMETHEUS / "tests.yml"

# Series Prometheus itself attaches to every scrape; not exported by the service but always there.
PROMETHEUS_SYNTHETIC = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
# Grafana variables replaced by something PromQL accepts, for syntax checks.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}


def tool(name: str, apt_package: str) -> str:
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} not found; install it with: apt-get install -y --no-install-recommends {apt_package}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


# ---------------------------------------------------------------- PromQL metric names

_STRING_RE = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS_RE = re.compile(r"\{[^{}]*\}")
_RANGE_RE = re.compile(r"\[[^\[\]]*\]")
_GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_GRAFANA_VAR_RE = re.compile(r"\$\{[^}]*\}|\$\w+")
# A whole identifier (not a prefix of a longer one) that is not called like a function.
_IDENT_RE = re.compile(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}
    | {"inf", "nan", "atan2", "start", "end"}
)
_LABEL_VALUES_RE = re.compile(r"^\s*label_values\(\s*(.+?)\s*,\s*\w+\s*\)\s*$")


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (label names, functions, keywords and durations excluded)."""
    label_values = _LABEL_VALUES_RE.match(expr)
    if label_values:  # Grafana's label_values(selector, label) in template variables
        expr = label_values.group(1)
    if "__name__" in expr:
        raise ValueError(f"selecting by __name__ hides the metric name from this check: {expr}")
    text = _GRAFANA_VAR_RE.sub(" ", _STRING_RE.sub('""', expr))
    text = _RANGE_RE.sub(" ", _MATCHERS_RE.sub(" ", text))
    text = _GROUPING_RE.sub(" ", text)
    return {name for name in _IDENT_RE.findall(text) if name.lower() not in _KEYWORDS}


def exported_names(exposition: str) -> set[str]:
    """Series names a scrape of this exposition text can produce (histogram/counter suffixes included)."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            if kind == "counter":
                base = name.removesuffix("_total")
                names |= {f"{base}_total", f"{base}_created"}
            elif kind in ("histogram", "gaugehistogram"):
                names |= {name, f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
            elif kind == "summary":
                names |= {name, f"{name}_sum", f"{name}_count", f"{name}_created"}
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            match = re.match(r"[a-zA-Z_:][\w:]*", line)
            assert match is not None, line
            names.add(match.group(0))
    return names


def dashboard_exprs(node: Any) -> Iterator[str]:
    """Every PromQL expression of a dashboard: panel targets (rows included) and template variable queries."""
    if isinstance(node, dict):
        if isinstance(node.get("expr"), str):
            yield node["expr"]
        if node.get("type") == "query" and "name" in node:  # a template variable
            query = node.get("query")
            yield str(query["query"] if isinstance(query, dict) else query)
        for value in node.values():
            yield from dashboard_exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_exprs(item)


def yaml_exprs(text: str) -> list[str]:
    """`expr:` values of a rule file: plain, quoted or `|`/`>` block scalars (the forms alerts.yml uses)."""
    lines = text.splitlines()
    exprs: list[str] = []
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)(?:-\s+)?expr:\s*(.*)$", line)
        if not match:
            continue
        indent, value = len(match.group(1)), match.group(2).strip()
        if value[:1] in ("|", ">"):
            block = []
            for follow in lines[i + 1 :]:
                if follow.strip() and len(follow) - len(follow.lstrip()) <= indent:
                    break
                block.append(follow.strip())
            value = " ".join(part for part in block if part)
        elif value[:1] in ("'", '"'):
            value = value[1:-1]
        exprs.append(value)
    return exprs


def test_metric_names_of_typical_queries() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (le) (rate(hl_monitor_x_seconds_bucket{instance=~"$instance", a="b(c)"}'
        "[$__rate_interval])))"
    ) == {"hl_monitor_x_seconds_bucket"}
    assert metric_names(
        'max by (budget) (hl_monitor_budget_used{budget="users"} / hl_monitor_budget_capacity) > 0.9 '
        "and on (instance) up == 1"
    ) == {"hl_monitor_budget_used", "hl_monitor_budget_capacity", "up"}
    assert metric_names("sum(rate(foo_total[5m] offset 1h30m)) * 60 > bool 1e3") == {"foo_total"}
    assert metric_names("sum(x) without (kind) / ignoring (kind) group_left (job) y") == {"x", "y"}
    assert metric_names("label_values(hl_monitor_ready, instance)") == {"hl_monitor_ready"}
    assert metric_names('label_values(hl_monitor_ready{job="a"}, instance)') == {"hl_monitor_ready"}
    with pytest.raises(ValueError, match="__name__"):
        metric_names('{__name__=~"hl_.*"}')


def test_yaml_exprs_reads_plain_quoted_and_block_scalars() -> None:
    text = (
        "rules:\n"
        "  - alert: A\n"
        "    expr: up == 0\n"
        "  - alert: B\n"
        "    expr: 'x > 1'\n"
        "  - alert: C\n"
        "    expr: |\n"
        "      sum(a)\n"
        "        / sum(b)\n"
        "    for: 5m\n"
    )
    assert yaml_exprs(text) == ["up == 0", "x > 1", "sum(a) / sum(b)"]


async def served_metrics() -> str:
    """/metrics of a real server on a fresh Metrics: exactly what Prometheus would scrape from the service."""

    class Up:
        def readiness(self) -> Readiness:
            return Readiness()

        def status(self) -> dict[str, Any]:
            return {}

        def health_summary(self) -> dict[str, Any]:
            return {}

        async def address_detail(self, address: str) -> dict[str, Any] | None:
            return None

    cfg = HttpConfig(listen="127.0.0.1:0")
    async with (
        HttpServer(create_app(Up(), Metrics(), None, cfg), cfg.listen) as server,
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{server.port}/metrics") as resp,
    ):
        assert resp.status == 200
        return await resp.text()


async def test_suffix_rules_follow_the_exposition() -> None:
    names = exported_names(await served_metrics())
    assert "hl_monitor_signals_published_total" in names  # Counter X is exported as X_total
    assert "hl_monitor_signals_published" not in names
    assert "hl_monitor_positions_total" in names  # a gauge whose name happens to end in _total
    assert "hl_monitor_outbox_depth_total" not in names
    assert {"hl_monitor_signal_to_ack_seconds_bucket", "hl_monitor_signal_to_ack_seconds_count"} <= names
    assert "hl_monitor_feed_age_seconds" in names  # labelled and never set: still declared by # TYPE
    assert "process_resident_memory_bytes" in names


async def test_every_dashboard_and_alert_query_names_an_exported_metric() -> None:
    exported = exported_names(await served_metrics()) | PROMETHEUS_SYNTHETIC
    dashboard = json.loads(DASHBOARD.read_text())
    sources = {
        "dashboard": list(dashboard_exprs(dashboard)),
        "alerts.yml": yaml_exprs(ALERTS.read_text()),
    }
    series = re.findall(r"series:\s*['\"]([a-zA-Z_:][\w:]*)", RULE_TESTS.read_text())
    assert len(sources["dashboard"]) >= 40
    assert len(sources["alerts.yml"]) == 11
    assert len(series) >= 20
    unknown = {
        f"{where}: {name} in {expr}"
        for where, exprs in sources.items()
        for expr in exprs
        for name in metric_names(expr)
        if name not in exported
    }
    unknown |= {f"tests.yml input series: {name}" for name in series if name not in exported}
    assert not unknown, "\n".join(sorted(unknown))


# ---------------------------------------------------------------- dashboard


def test_dashboard_shows_every_required_view() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used = set().union(*(metric_names(e) for e in dashboard_exprs(dashboard)))
    required = {
        "hl_monitor_signals_built_total",  # signals per second by direction
        "hl_monitor_exchange_to_receive_seconds_bucket",  # latency percentiles per stage
        "hl_monitor_receive_to_signal_seconds_bucket",
        "hl_monitor_signal_to_ack_seconds_bucket",
        "hl_monitor_feed_age_seconds",
        "hl_monitor_connection_state",
        "hl_monitor_budget_used",
        "hl_monitor_budget_capacity",
        "hl_monitor_rest_weight_used_total",
        "hl_monitor_outbox_depth",
        "hl_monitor_writer_queue_depth",
        "hl_monitor_writer_retries_total",
        "hl_monitor_batch_write_duration_seconds_bucket",
        "hl_monitor_error_frames_total",
        "hl_monitor_publish_errors_total",
        "hl_monitor_reconnects_total",
        "hl_monitor_backfilled_fills_total",
        "hl_monitor_evictions_total",
        "hl_monitor_whale_notional_usd",  # whale positions: exposure per symbol, long/short split
        "hl_monitor_whale_unrealized_pnl_usd",
        "hl_monitor_positions_near_liquidation",  # at-risk count
        "hl_monitor_position_events_total",
        "hl_monitor_liquidation_alerts_total",
    }
    assert required <= used, sorted(required - used)
    direction = [e for e in dashboard_exprs(dashboard) if "hl_monitor_signals_built_total" in e]
    assert any("by (direction)" in e for e in direction)


def row_panels(dashboard: dict[str, Any], title: str) -> list[dict[str, Any]]:
    """The panels under the row titled `title` (up to the next row)."""
    panels: list[dict[str, Any]] = dashboard["panels"]
    start = next(i for i, p in enumerate(panels) if p["type"] == "row" and p["title"] == title)
    end = next((i for i in range(start + 1, len(panels)) if panels[i]["type"] == "row"), len(panels))
    return panels[start + 1 : end]


def test_whale_positions_row_shows_exposure_split_and_risk() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [e for panel in row_panels(dashboard, "Whale positions") for e in dashboard_exprs(panel)]
    notional = [e for e in exprs if "hl_monitor_whale_notional_usd" in e]
    assert any("by (symbol)" in e for e in notional)  # exposure per symbol
    assert any("by (side)" in e for e in notional)  # long/short split
    assert any('side="long"' in e and 'side="short"' in e for e in notional)  # net bias
    assert any(re.search(r"by \(level\) \(hl_monitor_positions_near_liquidation", e) for e in exprs)  # at risk
    # Every row is laid out below the one before it: the inserted row pushed the rest down.
    rows = [p["gridPos"]["y"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == sorted(rows)
    assert len(rows) == len(set(rows))


def test_liquidation_alert_selects_a_level_the_service_exports() -> None:
    metrics = Metrics()
    export_gauges(metrics, [], DEFAULT_ALERT_LEVELS)  # no positions: every level is exported as 0
    levels = {
        sample.labels["level"] for family in metrics.positions_near_liquidation.collect() for sample in family.samples
    }
    selected = re.findall(r'hl_monitor_positions_near_liquidation\{level="([^"]+)"\}', ALERTS.read_text())
    assert selected == [level_label(min(DEFAULT_ALERT_LEVELS))]  # the tightest, "imminent" level
    assert set(selected) <= levels


def test_dashboard_panels_are_laid_out_and_use_the_provisioned_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    provisioned = (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    uid_match = re.search(r"^\s*uid:\s*(\S+)", provisioned, re.M)
    assert uid_match is not None
    uids: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("datasource"), dict):
                uids.add(node["datasource"]["uid"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard)
    assert uids == {uid_match.group(1)}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
    provider = (GRAFANA / "provisioning" / "dashboards" / "hl-monitor.yml").read_text()
    compose = (REPO / "docker-compose.yml").read_text()
    path = re.search(r"path:\s*(\S+)", provider)
    assert path is not None
    assert f"./deploy/grafana/dashboards:{path.group(1)}:ro" in compose


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = tool("promtool", "prometheus")
    rules = []
    for i, expr in enumerate(dashboard_exprs(json.loads(DASHBOARD.read_text()))):
        if _LABEL_VALUES_RE.match(expr):
            continue
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr}"
        rules.append({"record": f"dashboard_query_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"  # JSON is YAML: promtool parses it as a rule file
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


# ---------------------------------------------------------------- Prometheus rules and config


def test_alert_rules_pass_promtool_check() -> None:
    promtool = tool("promtool", "prometheus")
    result = run(promtool, "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    # The line-based expr reader above must see every rule promtool sees.
    assert f"SUCCESS: {len(yaml_exprs(ALERTS.read_text()))} rules found" in result.stdout


def test_alert_rule_unit_tests_pass() -> None:
    promtool = tool("promtool", "prometheus")
    result = run(promtool, "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test() -> None:
    alerts = set(re.findall(r"^\s*-\s*alert:\s*(\S+)", ALERTS.read_text(), re.M))
    tested = set(re.findall(r"^\s*alertname:\s*(\S+)", RULE_TESTS.read_text(), re.M))
    assert alerts == {
        "HlMonitorDown",
        "HlMonitorNotReady",
        "HlMonitorFeedStale",
        "HlMonitorUserBudgetExhausted",
        "HlMonitorNatsDisconnected",
        "HlMonitorPublishErrors",
        "HlMonitorOutboxGrowing",
        "HlMonitorDatabaseDown",
        "HlMonitorWriterFailing",
        "HlMonitorTimeoutFlushesRising",
        "HlMonitorWhalesNearLiquidation",
    }
    assert alerts <= tested, sorted(alerts - tested)


def test_prometheus_config_is_valid_and_scrapes_the_compose_service() -> None:
    promtool = tool("promtool", "prometheus")
    result = run(promtool, "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    targets = re.findall(r"targets:\s*\[\"([^\"]+)\"\]", (PROMETHEUS / "prometheus.yml").read_text())
    assert targets == ["hl-monitor:8080"]


# ---------------------------------------------------------------- containers


def test_compose_file_validates() -> None:
    compose = tool("docker-compose", "docker-compose")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HL_", "COMPOSE_", "DOCKER_"))}
    result = subprocess.run(
        [compose, "-f", "docker-compose.yml", "config", "-q"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    services = run(compose, "-f", "docker-compose.yml", "config", "--services")
    assert set(services.stdout.split()) == {"mysql", "nats", "migrate", "hl-monitor", "prometheus", "grafana"}


def test_compose_wiring() -> None:
    text = (REPO / "docker-compose.yml").read_text()
    for source in re.findall(r"^\s*-\s*\./([^:]+):", text, re.M):
        assert (REPO / source).exists(), f"compose mounts missing ./{source}"
    hl = text.split("\n  hl-monitor:\n", 1)[1].split("\n  prometheus:\n", 1)[0]
    assert "condition: service_completed_successfully" in hl.split("migrate:", 1)[1]
    migrate = text.split("\n  migrate:\n", 1)[1].split("\n  hl-monitor:\n", 1)[0]
    assert 'command: ["db", "upgrade"]' in migrate
    assert "HL_MONITOR__DATABASE__URL: mysql+aiomysql://hl@mysql:3306/hl" in text
    assert '"-js"' in text


def dockerfile_stages() -> list[list[str]]:
    """Instructions per stage, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    stages: list[list[str]] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_final_stage_is_lean_and_unprivileged() -> None:
    builder, final = dockerfile_stages()
    assert any("uv sync --locked --no-dev" in line for line in builder)
    assert any(line == "RUN pip install --no-cache-dir uv==0.13.8" for line in builder)
    runs = " ".join(line for line in final if line.startswith("RUN "))
    for forbidden in ("apt-get install", "pip install", "uv ", "gcc", "build-essential"):
        assert forbidden not in runs
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users
    assert users[-1] not in ("root", "0")
    assert "EXPOSE 8080" in final
    assert any(line.startswith("HEALTHCHECK ") for line in final)
    assert final[-2:] == ['ENTRYPOINT ["hl-monitor"]', 'CMD ["run"]']
    allowed = {
        line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")
    }
    for line in builder:
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), source
                assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"


async def test_dockerfile_healthcheck_follows_liveness() -> None:
    final = dockerfile_stages()[-1]
    healthcheck = next(line for line in final if line.startswith("HEALTHCHECK "))
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    venv_bin = str(Path(sys.executable).parent)

    async def probe(port: int) -> int:
        env = {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}"}
        env["HL_MONITOR__HTTP__LISTEN"] = f"127.0.0.1:{port}"
        proc = await asyncio.create_subprocess_exec(
            *command, cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode is not None
        return proc.returncode

    class NotReady:
        def readiness(self) -> Readiness:
            return Readiness({"nats": "disconnected"})

        def status(self) -> dict[str, Any]:
            return {}

        def health_summary(self) -> dict[str, Any]:
            return {}

        async def address_detail(self, address: str) -> dict[str, Any] | None:
            return None

    cfg = HttpConfig(listen="127.0.0.1:0")
    server = HttpServer(create_app(NotReady(), Metrics(), None, cfg), cfg.listen)
    await server.start()
    port = server.port
    try:
        assert await probe(port) == 0  # live even while not ready: Docker must not restart it for a NATS outage
    finally:
        await server.stop()
    assert await probe(port) == 1
