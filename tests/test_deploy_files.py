"""deploy/ stays in step with the settings, with the drain and with itself.

No Docker daemon or Kubernetes cluster is needed: the files are parsed and cross-checked,
and `nginx -t` / `systemd-analyze verify` run when those tools are on the PATH.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from relay.config import Settings, settings_from_args
from tests.support.timing import MS

try:
    import yaml
except ImportError:  # pragma: no cover - pyyaml is in the dev extra
    yaml = None

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SETTINGS = {"RELAY_" + f.name.upper() for f in fields(Settings)}
DEFAULTS = {f.name: f.default for f in fields(Settings)}
SECRET_FLAGS = {
    "--" + f.name.replace("_", "-") for f in fields(Settings) if f.metadata.get("secret")
}
# What a drain may take beyond --drain-grace (nothing on a machine with time to spare, a
# second or two on a starved one) plus margin: every supervisor waits at least grace + this.
STOP_MARGIN = 15.0
# RELAY_* names in deploy/ that are not node settings, and why.
NOT_SETTINGS = {
    "RELAY_BIN": "local-cluster.sh: which relay executable to run",
    "RELAY_CLUSTER_DIR": "local-cluster.sh: its state directory",
    "RELAY_LISTEN": "nginx template placeholder",
    "RELAY_UPSTREAMS": "nginx template placeholder",
    "RELAY_SERVERS": "haproxy template placeholder",
}

NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")

needs_yaml = pytest.mark.skipif(yaml is None, reason="pyyaml not installed")


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def _docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _k8s() -> dict[str, dict[str, Any]]:
    """Kind -> the one object of that kind under deploy/k8s."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in _docs(path):
            if doc.get("kind") != "Kustomization":
                assert doc["kind"] not in objects, f"two {doc['kind']} objects"
                objects[doc["kind"]] = doc
    return objects


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "docker/compose.yaml").read_text())
    return doc


def _relay_services(compose: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


def _env_file(path: Path) -> dict[str, str]:
    """KEY=value lines of a systemd or compose environment file."""
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def _unit(name: str) -> dict[str, list[tuple[str, str]]]:
    """Section -> (key, value) pairs of a systemd unit, repeated keys kept."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in (DEPLOY / "systemd" / name).read_text().splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        elif line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            current.append((key, value))
    return sections


def _seconds(text: str | int | float) -> float:
    """`30`, `30s`, `1m30s` (compose durations and systemd time spans)."""
    if isinstance(text, int | float):
        return float(text)
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|min|sec)?", text):
        scale = {"ms": 0.001, "m": 60, "min": 60, "h": 3600}.get(unit, 1)
        total += float(number) * scale
    return total


def _dockerfile() -> dict[str, list[str]]:
    """Instruction -> its arguments, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "docker/Dockerfile").read_text())
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.setdefault(word.upper(), []).append(rest.strip())
    return out


def _bind_mounts(service: Mapping[str, Any]) -> dict[Path, str]:
    """Host file (resolved from deploy/docker) -> its path in the container."""
    mounts = {}
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[(DEPLOY / "docker" / source).resolve()] = target
    return mounts


def _checked_settings(env: Mapping[str, str]) -> Settings:
    unknown = set(env) - SETTINGS
    assert not unknown, f"not relay settings: {sorted(unknown)}"
    return settings_from_args(None, env)


def _deploy_texts() -> Iterator[tuple[Path, str]]:
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            yield path, path.read_text()


# -- every file --------------------------------------------------------------------------


def test_deploy_env_vars_are_all_settings() -> None:
    """Every RELAY_* name in deploy/ is a relay setting (or a listed script variable)."""
    for path, text in _deploy_texts():
        for name in set(re.findall(r"RELAY_[A-Z0-9_]*[A-Z0-9]", text)):
            assert name in SETTINGS or name in NOT_SETTINGS, f"{path}: {name} is not a setting"
    for name in NOT_SETTINGS:
        assert any(name in text for _, text in _deploy_texts()), f"{name} is used nowhere"


@needs_yaml
def test_deploy_yaml_files_parse() -> None:
    """Every YAML file under deploy/ parses into at least one document."""
    files = _yaml_files()
    assert {p.parent.name for p in files} >= {"docker", "k8s"}
    for path in files:
        assert _docs(path), f"{path} is empty"


@needs_yaml
def test_deploy_settings_values_are_accepted() -> None:
    """The RELAY_* values each deploy file sets are accepted by relay.config."""
    k8s = _k8s()
    pod_env = {**k8s["ConfigMap"]["data"], **k8s["Secret"]["stringData"]}
    _checked_settings(pod_env).check_auth()
    compose = _compose()
    dotenv = _env_file(DEPLOY / "docker/env.example")
    for svc in _relay_services(compose).values():
        _checked_settings({**svc["environment"], **dotenv}).check_auth()
    _checked_settings(_env_file(DEPLOY / "systemd/relay.env.example")).check_auth()


# -- Kubernetes ----------------------------------------------------------------------------


@needs_yaml
def test_k8s_deployment_probes_and_drain_fit() -> None:
    """Readiness /readyz, liveness /healthz, a preStop sleep, and time for the drain."""
    k8s = _k8s()
    spec = k8s["Deployment"]["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    grace = float(k8s["ConfigMap"]["data"].get("RELAY_DRAIN_GRACE", DEFAULTS["drain_grace"]))
    assert pod["terminationGracePeriodSeconds"] >= float(command[1]) + grace + STOP_MARGIN
    assert spec["replicas"] >= 3
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # A Service named `relay` would otherwise inject RELAY_PORT=tcp://...
    assert pod["enableServiceLinks"] is False
    assert set(container["resources"]) == {"requests", "limits"}


@needs_yaml
def test_k8s_deployment_runs_non_root_read_only() -> None:
    """Pod and container are non-root (the image's uid), read-only, without privileges."""
    pod = _k8s()["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    uid = _dockerfile()["USER"][-1].split(":")[0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == uid != "0"
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]


@needs_yaml
def test_k8s_objects_refer_to_each_other() -> None:
    """Names, labels and ports agree across the manifests; none sets a namespace."""
    k8s = _k8s()
    assert {
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
        "Ingress",
    } <= set(k8s)
    for obj in k8s.values():
        assert "namespace" not in obj["metadata"]
    template = k8s["Deployment"]["spec"]["template"]
    labels = template["metadata"]["labels"]
    (container,) = template["spec"]["containers"]
    refs = {next(iter(ref)): ref[next(iter(ref))]["name"] for ref in container["envFrom"]}
    assert refs == {
        "configMapRef": k8s["ConfigMap"]["metadata"]["name"],
        "secretRef": k8s["Secret"]["metadata"]["name"],
    }
    assert not set(k8s["ConfigMap"]["data"]) & set(k8s["Secret"]["stringData"])
    for selector in (
        k8s["Deployment"]["spec"]["selector"]["matchLabels"],
        k8s["Service"]["spec"]["selector"],
        k8s["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()
    port_names = {p["name"] for p in container["ports"]}
    service_ports = {p["name"] for p in k8s["Service"]["spec"]["ports"]}
    assert {p["targetPort"] for p in k8s["Service"]["spec"]["ports"]} <= port_names
    for rule in k8s["Ingress"]["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == k8s["Service"]["metadata"]["name"]
            assert backend["port"]["name"] in service_ports
    annotations = k8s["Ingress"]["metadata"]["annotations"]
    heartbeat = float(k8s["ConfigMap"]["data"].get("RELAY_HEARTBEAT", DEFAULTS["heartbeat"]))
    assert float(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > heartbeat
    kustomization = yaml.safe_load((DEPLOY / "k8s/kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (DEPLOY / "k8s" / resource).is_file()


# -- Docker --------------------------------------------------------------------------------


def test_dockerfile_non_root_healthcheck_stopsignal_exec_cmd() -> None:
    """Non-root USER, HEALTHCHECK on /healthz, STOPSIGNAL SIGTERM, exec-form CMD."""
    df = _dockerfile()
    assert df["FROM"] == ["python:3.11-slim"]
    user = df["USER"][-1].split(":")[0]
    assert user not in ("", "0", "root")
    assert len(df["HEALTHCHECK"]) == 1 and "/healthz" in df["HEALTHCHECK"][0]
    assert df["STOPSIGNAL"] == ["SIGTERM"]
    assert df["EXPOSE"] == ["8080"]
    assert json.loads(df["CMD"][-1]) == ["relay", "serve", "--host", "0.0.0.0", "--port", "8080"]
    assert "ENTRYPOINT" not in df


def test_dockerignore_lets_in_what_the_dockerfile_copies() -> None:
    """.dockerignore excludes everything but the COPY sources, and never a .env."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"
    assert "**/.env" in patterns
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = {src for args in _dockerfile()["COPY"] for src in args.split()[:-1]}
    assert copied == allowed
    for source in copied:
        assert (ROOT / source).exists()


@needs_yaml
def test_compose_nodes_drain_and_keep_secrets_out() -> None:
    """Nodes get time to drain, Redis uses deploy/redis/redis.conf, secrets come from .env."""
    compose = _compose()
    nodes = _relay_services(compose)
    assert len(nodes) == 3
    assert len({svc["environment"]["RELAY_NODE_ID"] for svc in nodes.values()}) == 3
    for svc in nodes.values():
        env = svc["environment"]
        grace = float(env.get("RELAY_DRAIN_GRACE", DEFAULTS["drain_grace"]))
        assert _seconds(svc["stop_grace_period"]) >= grace + STOP_MARGIN
        assert env["RELAY_REDIS_URL"].startswith("redis://redis:")
        assert not {"RELAY_AUTH_SECRET", "RELAY_API_KEY"} & set(env)
        assert svc["env_file"] == ".env"
        assert (DEPLOY / "docker" / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
    assert (DEPLOY / "docker/.gitignore").read_text().split()[-1] == ".env"
    redis = compose["services"]["redis"]
    mounts = _bind_mounts(redis)
    (conf,) = (src for src, target in mounts.items() if target in redis["command"])
    assert conf == DEPLOY / "redis/redis.conf"


def _render_compose_nginx(compose: Mapping[str, Any], out: Path) -> str:
    """Run the sed of the nginx service's command on the real template; returns the rest."""
    nginx = compose["services"]["nginx"]
    assert nginx["command"][:2] == ["sh", "-c"]
    render, _, rest = nginx["command"][2].partition("&&")
    words = shlex.split(render)
    assert words[0] == "sed" and words[-2] == ">"
    targets = {target: src for src, target in _bind_mounts(nginx).items()}
    template = targets[words[-3]]
    assert template == DEPLOY / "nginx/relay.conf.template"
    with out.open("w") as f:
        subprocess.run([*words[:-3], str(template)], stdout=f, check=True, timeout=10_000 * MS)
    return rest.strip()


@needs_yaml
def test_compose_nginx_renders_the_template_for_every_node(tmp_path: Path) -> None:
    """The compose nginx config is the shipped template with one server per relay node."""
    compose = _compose()
    (tmp_path / "nginx/tmp").mkdir(parents=True)
    (tmp_path / "logs").mkdir()
    conf = tmp_path / "nginx/relay.conf"
    rest = _render_compose_nginx(compose, conf)
    assert shlex.split(rest) == ["exec", "nginx", "-g", "daemon off;"]
    text = conf.read_text()
    assert "@@" not in text
    servers = re.findall(r"server (\S+):8080 ", text)
    assert sorted(servers) == sorted(_relay_services(compose))
    if NGINX is None:
        return
    # Syntax check with the local nginx: the node names resolve only inside compose, and
    # an nginx older than 1.27.3 knows no `resolve`, so both are taken out for it.
    text = re.sub(r"relay\d+:8080", "127.0.0.1:8080", text)
    version = subprocess.run([NGINX, "-v"], capture_output=True, text=True).stderr
    found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", version)
    if found and tuple(map(int, found.groups())) < (1, 27, 3):
        text = re.sub(r"resolver [^;]*;", "", text).replace(" resolve;", ";")
    conf.write_text(text)
    # Wrapped in the nginx.conf local-cluster.sh uses, exactly as it renders it.
    main = (DEPLOY / "nginx/nginx-local.conf.template").read_text()
    (tmp_path / "nginx/nginx.conf").write_text(main.replace("@@CLUSTER_DIR@@", str(tmp_path)))
    result = subprocess.run(
        [NGINX, "-q", "-t", "-p", f"{tmp_path}/nginx/", "-c", f"{tmp_path}/nginx/nginx.conf",
         "-e", f"{tmp_path}/logs/error.log"],
        capture_output=True, text=True, timeout=10_000 * MS,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_balancer_templates_never_mark_nodes_down_passively() -> None:
    """nginx servers carry max_fails=0 everywhere; HAProxy checks /readyz and never observes."""
    compose = (DEPLOY / "docker/compose.yaml").read_text()
    script = (DEPLOY / "local-cluster.sh").read_text()
    for text in (compose, script, (DEPLOY / "nginx/relay.conf.template").read_text()):
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        assert not re.search(r"max_fails=[1-9]", code)
    assert compose.count("max_fails=0") == len(_relay_services(yaml.safe_load(compose)))
    assert "NGINX_SERVER_PARAMS-max_fails=0" in script
    haproxy = (DEPLOY / "haproxy/relay.cfg.template").read_text()
    assert "option httpchk GET /readyz" in haproxy
    assert "observe layer7" not in haproxy.replace("No `observe layer7`", "")
    assert "on-marked-down" not in haproxy.replace("(no on-marked-down)", "")


HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")


@pytest.mark.skipif(HAPROXY is None, reason="haproxy not installed")
def test_haproxy_template_renders_and_passes_haproxy_check(tmp_path: Path) -> None:
    """The HAProxy template, rendered as local-cluster.sh does, is accepted by `haproxy -c`."""
    assert HAPROXY is not None
    text = (DEPLOY / "haproxy/relay.cfg.template").read_text()
    text = text.replace("@@RELAY_LISTEN@@", "127.0.0.1:8080").replace(
        "@@RELAY_SERVERS@@",
        "server node1 127.0.0.1:8081 check\n    server node2 127.0.0.1:8082 check",
    )
    assert "@@" not in text
    (tmp_path / "relay.cfg").write_text(text)
    glob = DEPLOY / "haproxy/haproxy-local.cfg.template"
    result = subprocess.run(
        [HAPROXY, "-c", "-f", str(glob), "-f", str(tmp_path / "relay.cfg")],
        capture_output=True, text=True, timeout=10_000 * MS,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ALERT" not in result.stdout + result.stderr


# -- systemd -------------------------------------------------------------------------------

UNITS = ("relay.service", "relay@.service")


@pytest.mark.parametrize("name", UNITS)
def test_systemd_unit_key_directives(name: str) -> None:
    """Venv ExecStart without secrets, SIGTERM, a stop timeout above the drain, sandbox."""
    service = dict(_unit(name)["Service"])
    exec_start = shlex.split(service["ExecStart"])
    assert exec_start[0].endswith("/venv/bin/relay") and exec_start[1] == "serve"
    assert not SECRET_FLAGS & {arg.split("=")[0] for arg in exec_start}
    assert service["EnvironmentFile"] == "/etc/relay/relay.env"
    assert (service["User"], service["Restart"], service["KillSignal"]) == (
        "relay",
        "on-failure",
        "SIGTERM",
    )
    env = _env_file(DEPLOY / "systemd/relay.env.example")
    grace = float(env.get("RELAY_DRAIN_GRACE", DEFAULTS["drain_grace"]))
    assert _seconds(service["TimeoutStopSec"]) >= grace + STOP_MARGIN
    assert int(service["LimitNOFILE"]) > DEFAULTS["max_connections"]
    assert service["NoNewPrivileges"] == service["PrivateTmp"] == "yes"
    assert service["ProtectSystem"] == "strict"


def test_systemd_template_unit_matches_single_unit() -> None:
    """relay@.service differs from relay.service only in ExecStart and its port flag."""
    single, template = (_unit(n)["Service"] for n in UNITS)
    assert [
        (k, v + " --port %i --node-id %H-%i" if k == "ExecStart" else v) for k, v in single
    ] == template
    assert _unit(UNITS[0])["Install"] == _unit(UNITS[1])["Install"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_units_verify(tmp_path: Path) -> None:
    """systemd-analyze verify accepts both units (paths pointed at this checkout)."""
    relay = Path(sys.executable).parent / "relay"
    if not relay.exists():
        pytest.skip("no relay console script beside this Python")
    env_file = DEPLOY / "systemd/relay.env.example"
    names = {"relay.service": "relay.service", "relay@.service": "relay@8081.service"}
    for source, target in names.items():
        text = (DEPLOY / "systemd" / source).read_text()
        text = text.replace("/opt/relay/venv/bin/relay", str(relay))
        text = text.replace("/etc/relay/relay.env", str(env_file))
        (tmp_path / target).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / t) for t in names.values())],
        capture_output=True, text=True, timeout=30_000 * MS,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Unknown or invalid directives are only warnings: any line about our units fails.
    complaints = [line for line in output.splitlines() if any(n in line for n in names.values())]
    assert not complaints, output
