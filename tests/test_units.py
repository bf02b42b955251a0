"""Deployment units match the service: the systemd unit's restart and stop policy, the Kubernetes manifests'
commands, ports, probes (requested against the real HTTP app), drain timing, config and secrets.

The manifests are read with a small loader for the YAML subset they use (block mappings and sequences,
JSON-style flow values, `|` literals); it fails loudly on anything else, so a manifest cannot silently
drift out of what this test understands. (No YAML library is a dependency of the project.)
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from hl_monitor.cli import EXIT_CONFIG, build_parser
from hl_monitor.config import ENV_PREFIX, SECRET_KEYS, Config, HttpConfig, ServiceConfig, load_config, parse_listen
from hl_monitor.metrics import Metrics
from hl_monitor.ops.http import HttpServer, Readiness, create_app

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "deploy" / "systemd" / "hl-monitor.service"
K8S = REPO / "deploy" / "k8s"


# ---------------------------------------------------------------- a loader for the YAML subset of deploy/k8s


def _scalar(text: str) -> Any:
    if text.startswith(("[", "{", '"')):
        return json.loads(text)  # flow values are written JSON-compatible
    if text.startswith("'") and text.endswith("'"):
        return text[1:-1]
    if text in ("true", "false"):
        return text == "true"
    try:
        return int(text)
    except ValueError:
        return text


class _Yaml:
    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.i = 0

    def _next(self) -> tuple[int, str] | None:
        """Indent and text of the next meaningful line (blank lines and comment lines skipped)."""
        while self.i < len(self.lines):
            raw = self.lines[self.i]
            text = raw.strip()
            if text and not text.startswith("#"):
                if "\t" in raw[: len(raw) - len(raw.lstrip())]:
                    raise ValueError(f"line {self.i + 1}: tab indentation")
                return len(raw) - len(raw.lstrip(" ")), text
            self.i += 1
        return None

    def document(self) -> Any:
        head = self._next()
        if head is None:
            return None
        value = self._block(head[0])
        if self._next() is not None:
            raise ValueError(f"line {self.i + 1}: unexpected dedent")
        return value

    def _block(self, indent: int) -> Any:
        head = self._next()
        assert head is not None
        return self._seq(indent) if head[1] == "-" or head[1].startswith("- ") else self._map(indent)

    def _map(self, indent: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while (head := self._next()) is not None and head[0] >= indent:
            ind, text = head
            if ind > indent:
                raise ValueError(f"line {self.i + 1}: unexpected indent")
            if text.startswith("- "):
                break
            key, sep, rest = text.partition(":")
            if not sep or " #" in rest:
                raise ValueError(f"line {self.i + 1}: not a `key: value` line (or an inline comment): {text!r}")
            self.i += 1
            if key in out:
                raise ValueError(f"line {self.i}: duplicate key {key!r}")
            out[_scalar(key)] = self._value(rest.strip(), indent)
        return out

    def _value(self, rest: str, indent: int) -> Any:
        if rest == "|":
            return self._literal(indent)
        if rest:
            return _scalar(rest)
        head = self._next()
        if head is None:
            return None
        ind, text = head
        if text.startswith("- ") and ind >= indent:
            return self._seq(ind)
        return self._map(ind) if ind > indent else None

    def _literal(self, indent: int) -> str:
        body: list[str] = []
        while self.i < len(self.lines):
            raw = self.lines[self.i]
            if raw.strip() and len(raw) - len(raw.lstrip(" ")) <= indent:
                break
            body.append(raw)
            self.i += 1
        while body and not body[-1].strip():
            body.pop()
        cut = min(len(line) - len(line.lstrip(" ")) for line in body if line.strip())
        return "\n".join(line[cut:] for line in body) + "\n"

    def _seq(self, indent: int) -> list[Any]:
        out: list[Any] = []
        while (head := self._next()) is not None and head[0] == indent and head[1].startswith("- "):
            rest = head[1][2:].strip()
            _, sep, after = rest.partition(":")
            if sep and not rest.startswith(("[", "{", '"', "'")) and (not after or after.startswith(" ")):
                self.lines[self.i] = " " * (indent + 2) + rest  # "- key: value" opens a mapping
                out.append(self._map(indent + 2))
            else:
                self.i += 1
                out.append(_scalar(rest))
        return out


def load_yaml(path: Path) -> list[Any]:
    return [_Yaml(doc).document() for doc in path.read_text().split("\n---\n")]


def test_the_yaml_subset_loader_reads_what_the_manifests_use() -> None:
    text = (
        'a:\n  b: 1\n  c: "x"\n  d: ["p", "q"]\n  e:\n    - name: n\n      v: true\n    - plain\n'
        "  f: |\n    k = 1\n    # kept\n  g: {}\n"
    )
    doc = _Yaml(text).document()
    assert doc == {
        "a": {
            "b": 1,
            "c": "x",
            "d": ["p", "q"],
            "e": [{"name": "n", "v": True}, "plain"],
            "f": "k = 1\n# kept\n",
            "g": {},
        }
    }
    with pytest.raises(ValueError, match="inline comment"):
        _Yaml("a: 1 # no\n").document()


# ---------------------------------------------------------------- systemd


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert current is not None, f"{path.name}:{number}: outside a section"
        assert sep, f"{path.name}:{number}: not `Key=value`"
        assert " #" not in value, f"{path.name}:{number}: systemd has no inline comments; it would keep the text"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(value: str) -> float:
    return float(value.removesuffix("s"))


def test_systemd_unit_restarts_on_failure_only_and_outlasts_the_graceful_stop() -> None:
    service = read_unit(UNIT)["Service"]
    assert service["Restart"] == ["on-failure"]  # exit 0 (clean stop) is never restarted
    assert str(EXIT_CONFIG) in service["RestartPreventExitStatus"][0].split()  # bad config: no restart loop
    assert service["KillSignal"] == ["SIGTERM"]  # the signal the service drains on
    assert service["KillMode"] == ["mixed"]  # SIGTERM to the main process; the embedded nats-server is its child
    assert seconds(service["TimeoutStopSec"][0]) > ServiceConfig().shutdown_timeout
    unit = read_unit(UNIT)["Unit"]
    assert int(unit["StartLimitBurst"][0]) > 1


def test_systemd_unit_runs_the_service_with_its_state_directory() -> None:
    service = read_unit(UNIT)["Service"]
    (exec_start,) = service["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0].startswith("/")  # systemd needs an absolute path
    assert argv[0].endswith("/hl-monitor")
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run"
    assert args.config == Path("/etc/hl-monitor/cfg.toml")
    state_dir = "/var/lib/" + service["StateDirectory"][0]
    env = dict(item.split("=", 1) for item in service["Environment"])
    assert env[f"{ENV_PREFIX}SERVICE__DATA_DIR"] == state_dir == service["WorkingDirectory"][0]
    assert load_config(None, environ=env).service.data_dir == state_dir  # the override is a real key


# ---------------------------------------------------------------- Kubernetes


def manifests() -> dict[str, dict[str, Any]]:
    """Every resource the kustomization lists, by kind."""
    (kustomization,) = load_yaml(K8S / "kustomization.yaml")
    by_kind: dict[str, dict[str, Any]] = {}
    for name in kustomization["resources"]:
        for doc in load_yaml(K8S / name):
            assert doc["kind"] not in by_kind, f"two {doc['kind']} resources"
            by_kind[doc["kind"]] = doc
    assert set(by_kind) == {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget"}
    return by_kind


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = manifests()["Deployment"]["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    (main,) = pod_spec()["containers"]
    assert isinstance(main, dict)
    return main


def configmap_config(tmp_path: Path) -> Config:
    """The ConfigMap's cfg.toml loaded by the real loader, with the Secret's keys set as the pod sets them."""
    data = manifests()["ConfigMap"]["data"]
    (name,) = data
    path = tmp_path / name
    path.write_text(data[name])
    secrets = dict.fromkeys(manifests()["Secret"]["stringData"], "placeholder")
    return load_config(path, environ=secrets)


def test_k8s_container_runs_the_service_with_the_configmap_and_the_secret(tmp_path: Path) -> None:
    main = container()
    args = build_parser().parse_args(main["args"])  # the image's ENTRYPOINT is `hl-monitor`
    assert args.command == "run"
    assert 'ENTRYPOINT ["hl-monitor"]' in (REPO / "Dockerfile").read_text()
    config_mount = next(m for m in main["volumeMounts"] if m["name"] == "config")
    volume = next(v for v in pod_spec()["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == manifests()["ConfigMap"]["metadata"]["name"]
    assert args.config.parent == Path(config_mount["mountPath"])
    assert args.config.name in manifests()["ConfigMap"]["data"]
    (init,) = pod_spec()["initContainers"]
    init_args = build_parser().parse_args(init["args"])
    assert (init_args.command, init_args.db_command, init_args.config) == ("db", "upgrade", args.config)
    for spec in (main, init):
        assert spec["envFrom"] == [{"secretRef": {"name": manifests()["Secret"]["metadata"]["name"]}}]
    cfg = configmap_config(tmp_path)  # valid: no ConfigError
    data_mount = next(m for m in main["volumeMounts"] if m["mountPath"] == cfg.service.data_dir)
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    assert {data_mount["mountPath"], "/tmp"} <= {m["mountPath"] for m in main["volumeMounts"]}


def test_k8s_secret_and_env_keys_are_the_service_s_override_names() -> None:
    for key in manifests()["Secret"]["stringData"]:
        assert key.startswith(ENV_PREFIX)
        assert key.removeprefix(ENV_PREFIX).lower().replace("__", ".") in SECRET_KEYS
    env = {e["name"]: e for e in container()["env"]}
    assert env[f"{ENV_PREFIX}SERVICE__INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert load_config(None, environ={f"{ENV_PREFIX}SERVICE__INSTANCE_ID": "pod-1"}).instance_id == "pod-1"


def test_k8s_ports_match_the_listen_address(tmp_path: Path) -> None:
    cfg = configmap_config(tmp_path)
    (port,) = container()["ports"]
    assert port["containerPort"] == parse_listen(cfg.http.listen)[1]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container()[probe]["httpGet"]["port"] == port["name"]
    (service_port,) = manifests()["Service"]["spec"]["ports"]
    assert service_port["targetPort"] == port["name"]
    annotations = manifests()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port["containerPort"]


async def test_k8s_probes_hit_the_real_endpoints_with_the_right_semantics() -> None:
    """Liveness stays 200 during an outage (a restart cannot fix it); readiness turns 503 and says why."""

    class Outage:
        def readiness(self) -> Readiness:
            return Readiness({"nats": "disconnected"})

        def status(self) -> dict[str, Any]:
            return {}

        def health_summary(self) -> dict[str, Any]:
            return {}

        async def address_detail(self, address: str) -> dict[str, Any] | None:
            return None

    main = container()
    paths = {probe: main[probe]["httpGet"]["path"] for probe in ("startupProbe", "livenessProbe", "readinessProbe")}
    annotations = manifests()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    paths["metrics"] = annotations["prometheus.io/path"]
    cfg = HttpConfig(listen="127.0.0.1:0")
    async with (
        HttpServer(create_app(Outage(), Metrics(), None, cfg), cfg.listen) as server,
        aiohttp.ClientSession(base_url=f"http://127.0.0.1:{server.port}") as http,
    ):
        statuses = {}
        for probe, path in paths.items():
            async with http.get(path) as resp:
                statuses[probe] = resp.status
    assert statuses == {"startupProbe": 200, "livenessProbe": 200, "readinessProbe": 503, "metrics": 200}


def test_k8s_termination_grace_covers_the_drain(tmp_path: Path) -> None:
    cfg = configmap_config(tmp_path)
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    grace = pod_spec()["terminationGracePeriodSeconds"]
    assert grace > int(command[1]) + cfg.service.shutdown_timeout  # SIGKILL never cuts the drain short
    liveness = container()["livenessProbe"]
    assert liveness["timeoutSeconds"] < liveness["periodSeconds"]


def test_k8s_replicas_scale_with_cluster_mode_and_disruptions_take_one_pod(tmp_path: Path) -> None:
    cfg = configmap_config(tmp_path)
    deployment = manifests()["Deployment"]["spec"]
    if deployment["replicas"] > 1:  # several instances must share the precise addresses, not duplicate them
        assert cfg.cluster.mode == "nats"
        assert cfg.nats.url != "embedded"
    assert deployment["strategy"]["rollingUpdate"]["maxSurge"] == 0  # never one pod more than planned
    labels = deployment["template"]["metadata"]["labels"]
    assert deployment["selector"]["matchLabels"].items() <= labels.items()
    pdb = manifests()["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["maxUnavailable"] == 1
    assert manifests()["Service"]["spec"]["selector"].items() <= labels.items()
