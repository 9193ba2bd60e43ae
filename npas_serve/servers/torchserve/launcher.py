"""`npas-serve torchserve start|stop|status`: run TorchServe (the Java frontend) for a .mar.

Everything TorchServe writes (config.properties, the metrics YAML, key_file.json
with the auth tokens, logs, its pid file) goes in one run directory, so two
instances never collide through /tmp. Readiness is a worker that answers: the
management API's describe with `customized=true`, which the worker itself handles
(`/ping` says Healthy while a worker crash-loops, and the worker list can show a
dead process as READY). Token keys expire (`token_expiration_min`); a renewer in
TorchServe's own process group renews them before they do (`renewer`).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from npas_serve.errors import UserError
from npas_serve.servers.metrics import METRICS
from npas_serve.servers.torchserve.keys import KEY_FILE, run_dir_key
from npas_serve.servers.torchserve.processes import group_pids

PID = "torchserve.pid"
TOKEN_LIFETIME_MIN = 60.0       # TorchServe 0.12's default lifetime of the inference and management keys


@dataclass
class Ports:
    grpc: int = 7070
    grpc_management: int = 7071
    http: int = 8080
    management: int = 8081
    metrics: int = 8082


# Loggers of TorchServe's frontend that write lines per request or per batch (job timings, batch
# hand-offs, each metric line the worker prints): under load, about 30 formatted lines per request,
# several written twice, took a share of the frontend's CPU on the cores the workers need.
PER_REQUEST_LOGGERS = ("org.pytorch.serve.wlm", "org.pytorch.serve.job")
LOG_CONFIG = "log4j2.xml"         # in the run directory, beside config.properties, which points at it


def log_config() -> str:
    """TorchServe's own log4j2.xml (from its frontend jar), less its per-request chatter: the frontend
    at INFO (not DEBUG), the loggers of PER_REQUEST_LOGGERS at WARN, every line written once (to its
    logger's own file, not again through the root logger's), the console at WARN. The files, the
    access log (a line per request) and the workers' own output (model_log.log) are kept."""
    import zipfile
    import xml.etree.ElementTree as ET

    import ts

    with zipfile.ZipFile(Path(ts.__file__).parent / "frontend" / "model-server.jar") as jar:
        root = ET.fromstring(jar.read("log4j2.xml"))
    loggers = root.find("Loggers")
    for logger in loggers.findall("Logger"):
        if logger.find("AppenderRef") is not None:          # its own file: not the root's appenders too
            logger.set("additivity", "false")
        if logger.get("name") == "org.pytorch.serve":       # debug by default
            logger.set("level", "info")
    for name in PER_REQUEST_LOGGERS:
        quiet = ET.SubElement(loggers, "Logger", name=name, level="warn", additivity="false")
        ET.SubElement(quiet, "AppenderRef", ref="ts_log")
    loggers.find("Root").set("level", "warn")
    return ET.tostring(root, encoding="unicode")


def metrics_yaml() -> str:
    """TorchServe's default metrics plus ours under `model_metrics:` (only declared ones are exported)."""
    import yaml
    import ts

    base = yaml.safe_load((Path(ts.__file__).parent / "configs" / "metrics.yaml").read_text())
    model = base.setdefault("model_metrics", {})
    for spec in METRICS:
        model.setdefault(spec.kind, []).append(
            {"name": spec.name, "unit": spec.unit, "dimensions": ["ModelName", "Level", *spec.labels]})
    return yaml.safe_dump(base, sort_keys=False)


def config_properties(run_dir: Path, model_store: Path, host: str, ports: Ports, dev: bool,
                      token_lifetime_min: float = TOKEN_LIFETIME_MIN) -> str:
    lines = {
        "inference_address": f"http://{host}:{ports.http}",
        "management_address": f"http://{host}:{ports.management}",
        "metrics_address": f"http://{host}:{ports.metrics}",
        "grpc_inference_address": host,
        "grpc_management_address": host,
        "grpc_inference_port": ports.grpc,
        "grpc_management_port": ports.grpc_management,
        "enable_grpc_ssl": "false",
        "metrics_mode": "prometheus",
        "metrics_config": run_dir / "metrics.yaml",
        "model_store": model_store,
        "default_workers_per_model": 1,
        "disable_token_authorization": "true" if dev else "false",
        "token_expiration_min": f"{token_lifetime_min:g}",
        # request bodies reach the handler as bytes, which bounds their size before anything parses
        # them (the worker would otherwise json.loads an application/json body of any size first)
        "decode_input_request": "false",
        "install_py_dep_per_model": "false",
        "model_metrics_auto_detect": "false",
        "disable_system_metrics": "true",
        # the frontend's logging without its per-request lines (`log_config`), wherever this file is used
        "vmargs": f"-Dlog4j.configurationFile=file://{Path(run_dir).resolve() / LOG_CONFIG}",
    }
    return "".join(f"{k}={v}\n" for k, v in lines.items())


def write_config(run_dir: Path, model_store: Path, host: str, ports: Ports, dev: bool,
                 token_lifetime_min: float = TOKEN_LIFETIME_MIN) -> Path:
    """Write what TorchServe reads at start into `run_dir`: config.properties, and the metrics YAML and
    log configuration it names. `start` and the container images both write them here, so they
    never drift apart. Returns the path of config.properties."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.yaml").write_text(metrics_yaml())
    (run_dir / LOG_CONFIG).write_text(log_config())
    config = run_dir / "config.properties"
    config.write_text(config_properties(run_dir, model_store, host, ports, dev, token_lifetime_min))
    return config


@dataclass
class RunConfig:
    """What a run directory's config.properties says: so `status` and `stop` need no port flags."""

    ports: Ports
    host: str
    model_store: Path


def read_config(run_dir: Path) -> RunConfig | None:
    """The config.properties that `start` (or the container image) wrote into `run_dir`; None if none."""
    path = Path(run_dir) / "config.properties"
    if not path.is_file():
        return None
    props = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    host_port = lambda key: props[key].split("://", 1)[-1].rsplit(":", 1)  # noqa: E731
    ports = Ports(int(props["grpc_inference_port"]), int(props["grpc_management_port"]),
                  *(int(host_port(k)[1]) for k in ("inference_address", "management_address", "metrics_address")))
    return RunConfig(ports, host_port("management_address")[0], Path(props["model_store"]))


def start(model_store: Path, name: str = "npas", run_dir: Path = Path(".torchserve"), host: str = "127.0.0.1",
          ports: Ports | None = None, dev: bool = False, timeout_s: float = 180.0,
          env: dict[str, str] | None = None, token_lifetime_min: float = TOKEN_LIFETIME_MIN) -> int:
    """Start TorchServe with `<model_store>/<name>.mar`, wait for a worker that answers; returns the PID.

    `env` (e.g. OMP_NUM_THREADS) is added to the environment the frontend passes to its workers.
    With token auth on, a renewer joins TorchServe's process group and renews the keys before
    they expire (`token_lifetime_min`), so clients that read key_file.json keep working.
    """
    if not token_lifetime_min > 0:
        raise UserError(f"token lifetime must be a positive number of minutes, got {token_lifetime_min}")
    ports = ports or Ports()
    model_store, run_dir = Path(model_store).resolve(), Path(run_dir).resolve()
    mar = model_store / f"{name}.mar"
    if not mar.is_file():
        raise UserError(f"{mar} does not exist; build it with `npas-serve archive DIR --name {name}`")
    if shutil.which("java") is None:
        raise UserError("java is not on PATH; TorchServe needs Java 17 (apt-get install openjdk-17-jre-headless)")
    if running_pid(run_dir) is not None:
        raise UserError(f"TorchServe from {run_dir} is already running (pid {running_pid(run_dir)}); stop it first")
    write_config(run_dir, model_store, host, ports, dev, token_lifetime_min)
    (run_dir / "logs").mkdir(exist_ok=True)
    (run_dir / KEY_FILE).unlink(missing_ok=True)
    env = dict(os.environ, **(env or {}), TMPDIR=str(run_dir), TEMP=str(run_dir),
               LOG_LOCATION=str(run_dir / "logs"), METRICS_LOCATION=str(run_dir / "logs"))
    cmd = [str(Path(sys.executable).parent / "torchserve"), "--start", "--foreground", "--ncs",
           "--ts-config", str(run_dir / "config.properties"), "--model-store", str(model_store),
           "--models", f"{name}={name}.mar"]
    if dev:
        cmd.append("--disable-token-auth")
    else:
        # the renewer starts in the new session first, so it shares TorchServe's process group
        # (stop() ends both); then the shell becomes TorchServe itself, keeping the pid
        renewer = [sys.executable, "-m", "npas_serve.servers.torchserve.renewer", str(run_dir), host,
                   str(ports.management)]
        cmd = ["sh", "-c", f"{shlex.join(renewer)} & exec {shlex.join(cmd)}"]
    with open(run_dir / "logs" / "launcher.log", "ab") as log:
        # a session of its own: stop() signals the whole group (java and its Python workers)
        proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    (run_dir / PID).write_text(str(proc.pid))
    try:
        wait_ready(run_dir, name, ports, host, timeout_s, proc)
    except BaseException:
        stop(run_dir)
        raise
    return proc.pid


def _describe(run_dir: Path, name: str, ports: Ports, host: str, customized: bool, timeout_s: float) -> list:
    query = "?customized=true" if customized else ""
    req = urllib.request.Request(f"http://{host}:{ports.management}/models/{name}{query}")
    token = run_dir_key(run_dir, "management")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def worker_states(run_dir: Path, name: str, ports: Ports, host: str = "127.0.0.1") -> list[str]:
    """The workers' states as the frontend sees them (a dead process can still be listed READY)."""
    described = _describe(run_dir, name, ports, host, False, 5)
    return [w["status"] for model in described for w in model.get("workers", [])]


def worker_answers(run_dir: Path, name: str, ports: Ports, host: str = "127.0.0.1", timeout_s: float = 5.0) -> bool:
    """Whether a worker answers a request now: the describe that the handler itself replies to.

    It waits in the same queue as inference requests, so a worker that is wedged, dead or
    busy past `timeout_s` counts as not answering.
    """
    try:
        described = _describe(run_dir, name, ports, host, True, timeout_s)
    except (urllib.error.URLError, OSError, ValueError, UserError):
        return False
    return any(isinstance(m, dict) and m.get("customizedMetadata", {}).get("model_name") == name
               for m in described)


def wait_ready(run_dir: Path, name: str, ports: Ports, host: str, timeout_s: float,
               proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise UserError(f"TorchServe exited with status {proc.returncode}; see {run_dir / 'logs'}")
        try:
            if "READY" in worker_states(run_dir, name, ports, host) and worker_answers(run_dir, name, ports, host):
                return
        except (urllib.error.URLError, OSError, ValueError, UserError):
            pass   # frontend not up yet, or key file not (completely) written yet
        time.sleep(0.5)
    raise UserError(f"no TorchServe worker for '{name}' became READY and answered within {timeout_s:.0f}s; "
                    f"see {run_dir / 'logs' / 'model_log.log'}")


def running_pid(run_dir: Path) -> int | None:
    path = Path(run_dir) / PID
    if not path.is_file():
        return None
    pid = int(path.read_text().strip() or 0)
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return None
    return pid


def stop(run_dir: Path = Path(".torchserve"), timeout_s: float = 60.0) -> bool:
    """SIGTERM the TorchServe process group, SIGKILL what is left after `timeout_s`. False if none ran."""
    run_dir = Path(run_dir)
    pid = running_pid(run_dir)
    if pid is None:
        (run_dir / PID).unlink(missing_ok=True)
        return False
    pgid = os.getpgid(pid)
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and group_alive(pgid):
        time.sleep(0.2)
    if group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)
        time.sleep(0.5)
    (run_dir / PID).unlink(missing_ok=True)
    return True


def group_alive(pgid: int) -> bool:
    """Whether a live process is left in the group (reaping our own zombie launcher on the way)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # the launcher may be a zombie waiting for us to reap it
    try:
        os.waitpid(-pgid, os.WNOHANG)
    except ChildProcessError:
        pass
    return bool(group_pids(pgid))


@dataclass
class Status:
    text: str
    ready: bool           # a worker answered a request just now


def status(run_dir: Path, name: str, ports: Ports, host: str = "127.0.0.1", timeout_s: float = 5.0) -> Status:
    pid = running_pid(run_dir)
    if pid is None:
        return Status("stopped", False)
    try:
        states = worker_states(run_dir, name, ports, host)
    except (urllib.error.URLError, OSError, ValueError, UserError):
        return Status(f"running (pid {pid}), management API not answering", False)
    answers = worker_answers(run_dir, name, ports, host, timeout_s)
    verdict = "a worker answers" if answers else f"NOT READY: no worker answered within {timeout_s:g}s"
    return Status(f"running (pid {pid}), workers: {', '.join(states) or 'none'}; {verdict}", answers)
