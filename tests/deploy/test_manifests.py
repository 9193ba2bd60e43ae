"""Static checks of deploy/: everything parses, and every port, path, flag and metric name it
names is the one the code uses. No Docker engine or cluster runs here, so this is what can be
checked; test_live.py checks the same files against running servers and a real Prometheus.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from npas_serve.cli import build_parser
from npas_serve.servers.metrics import BY_NAME, METRICS
from npas_serve.servers.torchserve.launcher import Ports, config_properties, log_config, metrics_yaml
from tests.support.deploy import DEPLOY, ROOT, dashboard, dashboard_queries, metric_family, prometheus_binary

DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))
PORTS = asdict(Ports())
# labels a query may use besides each metric's own: TorchServe's, Prometheus' target labels,
# the `server` label the scrape configs set, and `le` of histogram buckets
EXTRA_LABELS = {"ModelName", "Level", "Hostname", "job", "instance", "server", "le"}


def yaml_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_objects() -> list[dict]:
    """The objects applied: the base manifests and KServe's (not kustomizations or patches)."""
    files = [*(DEPLOY / "k8s").glob("*.yaml"), *(DEPLOY / "k8s" / "kserve").glob("*.yaml")]
    return [d for p in sorted(files) if p.name != "kustomization.yaml" for d in yaml_docs(p)]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [tuple(line.split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#") and len(line.split(None, 1)) == 2]


def container_commands() -> list[list[str]]:
    """Every shell command line that starts a server: Dockerfile CMDs and Kubernetes args."""
    lines = []
    for path in DOCKERFILES:
        for op, rest in dockerfile_instructions(path):
            if op == "CMD":
                lines.append(json.loads(rest)[-1])
    for obj in k8s_objects():
        spec = obj.get("spec", {})
        pod = spec.get("template", {}).get("spec", spec)
        for c in pod.get("containers", []):
            lines += c.get("args", [])
    commands = []
    for line in lines:
        for part in re.split(r"&&", line.replace("${NPAS_MODEL}", "npas")):
            commands.append(shlex.split(part.replace("exec ", "", 1)))
    return commands


def test_every_yaml_and_json_file_parses():
    files = [p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml", ".json")]
    assert len(files) >= 12
    for path in files:
        docs = [json.loads(path.read_text())] if path.suffix == ".json" else yaml_docs(path)
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_dockerfiles_copy_files_that_exist_and_pin_torch():
    assert {p.name for p in DOCKERFILES} == {"cpu.Dockerfile", "gpu.Dockerfile"}
    for path in DOCKERFILES:
        ins = dockerfile_instructions(path)
        for op, rest in ins:
            if op == "COPY":
                sources = [s for s in rest.split() if not s.startswith("--")][:-1]
                for src in sources:
                    assert (ROOT / src).exists(), f"{path.name}: COPY {src} does not exist"
        runs = " ".join(rest for op, rest in ins if op == "RUN")
        assert '"torch==2.13.0"' in runs, path.name
        # non-root: every stage that runs a server switches to the unprivileged user
        assert sum(op == "USER" for op, _ in ins) == sum(op == "HEALTHCHECK" for op, _ in ins) >= 1
        assert all(rest == "model-server" for op, rest in ins if op == "USER")
        for op, rest in ins:
            if op == "HEALTHCHECK":
                cmd = json.loads(rest.split("CMD", 1)[1])
                assert (ROOT / "deploy" / "docker" / Path(cmd[1]).name).is_file()
                assert cmd[2] in ("torchserve", "embedded")
    cpu = (DEPLOY / "docker" / "cpu.Dockerfile").read_text()
    assert "download.pytorch.org/whl/cpu" in cpu          # the CPU build, not the CUDA wheel
    assert {"AS base", "AS torchserve", "AS embedded"} <= {m.group(0) for m in re.finditer(r"AS \w+", cpu)}


def test_exposed_and_published_ports_are_the_servers_ports():
    for path in DOCKERFILES:
        for op, rest in dockerfile_instructions(path):
            if op == "EXPOSE":
                assert {int(p) for p in rest.split()} <= set(PORTS.values()), path.name
    compose = yaml_docs(DEPLOY / "compose" / "compose.yaml")[0]
    for name in ("torchserve", "embedded"):
        inside = {int(p.split(":")[-1]) for p in compose["services"][name]["ports"]}
        assert inside <= set(PORTS.values())
        assert all(p.startswith("127.0.0.1:") for p in compose["services"][name]["ports"])
    prom = yaml_docs(DEPLOY / "compose" / "prometheus" / "prometheus.yml")[0]
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"torchserve:{Ports.metrics}", f"embedded:{Ports.metrics}"}
    assert {t.split(":")[0] for t in targets} <= set(compose["services"])
    for obj in k8s_objects():
        if obj["kind"] in ("Deployment", "ServingRuntime"):
            pod = obj["spec"]["template"]["spec"] if obj["kind"] == "Deployment" else obj["spec"]
            for port in pod["containers"][0]["ports"]:
                assert port["containerPort"] == PORTS.get(port.get("name", "http")), port
        if obj["kind"] == "Service":
            for port in obj["spec"]["ports"]:
                assert port["port"] == PORTS[port["name"]]
        if obj["kind"] == "Deployment":
            notes = obj["spec"]["template"]["metadata"]["annotations"]
            assert int(notes["prometheus.io/port"]) == Ports.metrics and notes["prometheus.io/path"] == "/metrics"
        if obj["kind"] == "InferenceService":
            assert int(obj["metadata"]["annotations"]["prometheus.kserve.io/port"]) == Ports.metrics


def test_server_command_lines_use_flags_the_programs_accept():
    from ts.arg_parser import ArgParser

    commands = container_commands()
    kinds = {c[0] for c in commands}
    assert kinds == {"python", "torchserve", "npas-serve"}, kinds
    for cmd in commands:
        if cmd[0] == "npas-serve":
            args = build_parser().parse_args(cmd[1:])
            assert args.host == "0.0.0.0" and args.grpc_port == Ports.grpc and args.metrics_port == Ports.metrics
        elif cmd[0] == "torchserve":
            args = ArgParser.ts_parser().parse_args(cmd[1:])
            assert args.start and args.foreground and args.models == ["npas=npas.mar"]
        else:
            assert (DEPLOY / "docker" / Path(cmd[1]).name).is_file() and cmd[2].startswith("/home/model-server")


def test_container_config_is_the_code_config(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("torchserve_config", DEPLOY / "docker" / "torchserve_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write(tmp_path / "on", Path("/store"))
    module.write(tmp_path / "off", Path("/store"), token_auth=False)
    on = (tmp_path / "on" / "config.properties").read_text()
    assert on == config_properties(tmp_path / "on", Path("/store"), "0.0.0.0", Ports(), dev=False)
    assert "disable_token_authorization=false" in on and "grpc_inference_address=0.0.0.0" in on
    assert "disable_token_authorization=true" in (tmp_path / "off" / "config.properties").read_text()
    declared = yaml.safe_load((tmp_path / "on" / "metrics.yaml").read_text())["model_metrics"]
    assert {m["name"] for ms in declared.values() for m in ms} >= set(BY_NAME)
    assert (tmp_path / "on" / "metrics.yaml").read_text() == metrics_yaml()
    # the JVM reads the quiet log configuration written beside config.properties
    assert f"vmargs=-Dlog4j.configurationFile=file://{tmp_path / 'on' / 'log4j2.xml'}" in on
    assert (tmp_path / "on" / "log4j2.xml").read_text() == log_config()


def test_compose_and_kustomize_refer_to_files_that_exist():
    compose_dir = DEPLOY / "compose"
    compose = yaml_docs(compose_dir / "compose.yaml")[0]
    for svc in compose["services"].values():
        if "build" in svc:
            assert (compose_dir / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        for volume in svc.get("volumes", []):
            assert (compose_dir / volume.split(":")[0]).exists(), volume
    providers = yaml_docs(compose_dir / "grafana" / "provisioning" / "dashboards" / "npas-serve.yaml")[0]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["grafana"]["volumes"]}
    host_dir = compose_dir / mounts[providers["providers"][0]["options"]["path"]]
    assert (host_dir / "npas-serve.json").is_file()
    datasource = yaml_docs(compose_dir / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")[0]
    uid = datasource["datasources"][0]["uid"]
    assert {p["datasource"]["uid"] for p in dashboard()["panels"]} == {uid}
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    for kustomization in (DEPLOY / "k8s").rglob("kustomization.yaml"):
        doc = yaml_docs(kustomization)[0]
        for res in doc.get("resources", []) + [p["path"] for p in doc.get("patches", [])]:
            assert (kustomization.parent / res).exists(), f"{kustomization}: {res}"
    listed = set(yaml_docs(DEPLOY / "k8s" / "kustomization.yaml")[0]["resources"])
    assert listed == {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}


def test_kubernetes_manifests_have_probes_resources_and_autoscaling():
    objs = {(o["kind"], o["metadata"]["name"]): o for o in k8s_objects()}
    deploy = objs["Deployment", "npas-torchserve"]
    pod = deploy["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert {"readinessProbe", "livenessProbe", "startupProbe"} <= set(container)
    assert container["readinessProbe"]["exec"]["command"][2] == "torchserve"   # a READY worker, not /ping
    assert container["resources"]["requests"]["cpu"] and pod["securityContext"]["runAsNonRoot"]
    hpa = objs["HorizontalPodAutoscaler", "npas-torchserve"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deploy["metadata"]["name"]
    service = objs["Service", "npas-torchserve"]
    assert service["spec"]["selector"] == deploy["spec"]["template"]["metadata"]["labels"]
    monitor = objs["ServiceMonitor", "npas-torchserve"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    isvc = objs["InferenceService", "npas"]
    runtime = isvc["spec"]["predictor"]["model"]["runtime"]
    assert ("ServingRuntime", runtime) in objs
    assert isvc["spec"]["predictor"]["model"]["modelFormat"]["name"] in {
        f["name"] for f in objs["ServingRuntime", runtime]["spec"]["supportedModelFormats"]}
    gpu = yaml_docs(DEPLOY / "k8s" / "gpu" / "gpu-resources.yaml")[0]
    assert gpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_dashboard_covers_the_issue_and_names_only_project_metrics():
    queries = dashboard_queries()
    names = {metric_family(n) for q in queries for n in re.findall(r"\bnpas_\w+", q)}
    assert names <= set(BY_NAME), names - set(BY_NAME)
    wanted = {"npas_requests_total", "npas_request_latency_seconds", "npas_members_run_total",
              "npas_exit_depth_total", "npas_budget_misses_total", "npas_resident_bank_bytes",
              "npas_cache_bytes", "npas_cache_hits_total"}
    assert wanted <= names
    for q in queries:
        used = set(re.findall(r"\bnpas_\w+", q))
        allowed = EXTRA_LABELS | {label for n in used for label in BY_NAME[metric_family(n)].labels}
        grouped = {x.strip() for g in re.findall(r"by \(([^)]*)\)", q) for x in g.split(",")}
        matched = set(re.findall(r"(\w+)=~?\"", q))
        assert grouped | matched <= allowed, (q, (grouped | matched) - allowed)
        if "histogram_quantile" in q:
            assert all(n.endswith("_bucket") for n in used) and "le" in grouped


@pytest.fixture(scope="session")
def promtool() -> str:
    return prometheus_binary("promtool")


def test_prometheus_config_passes_promtool(promtool):
    done = subprocess.run([promtool, "check", "config", str(DEPLOY / "compose" / "prometheus" / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_metrics_table_is_what_the_dashboard_expects():
    # every metric follows Prometheus naming; the dashboard's units depend on it
    # (a histogram's unit is seconds, or a count of examples for batch sizes)
    units = {"counter": ("_total",), "histogram": ("_seconds", "_examples"), "gauge": ("_bytes",)}
    for spec in METRICS:
        assert spec.name.endswith(units[spec.kind]), spec.name
