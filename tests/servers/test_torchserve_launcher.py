"""What `npas-serve torchserve` writes into its run directory, and reads back from it (no Java needed)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import yaml

from npas_serve.servers.metrics import METRICS
from npas_serve.servers.torchserve.launcher import (PER_REQUEST_LOGGERS, Ports, config_properties, group_alive,
                                                    log_config, metrics_yaml, read_config)
from npas_serve.servers.torchserve.processes import group_pids


def test_read_config_gives_back_the_ports_host_and_store_written(tmp_path):
    ports = Ports(17070, 17071, 18080, 18081, 18082)
    (tmp_path / "config.properties").write_text(config_properties(tmp_path, tmp_path / "store", "127.0.0.1",
                                                                  ports, dev=False))
    config = read_config(tmp_path)
    assert config.ports == ports and config.host == "127.0.0.1" and config.model_store == tmp_path / "store"
    assert read_config(tmp_path / "nothing") is None


def test_metrics_yaml_declares_every_project_metric_with_its_labels():
    declared = {m["name"]: m for kind in yaml.safe_load(metrics_yaml())["model_metrics"].values() for m in kind}
    for spec in METRICS:
        assert declared[spec.name]["dimensions"] == ["ModelName", "Level", *spec.labels]


def test_log_config_keeps_the_files_and_drops_the_per_request_lines():
    root = ET.fromstring(log_config())
    appenders = {a.get("name") for a in root.find("Appenders")}
    assert {"access_log", "model_log", "ts_log"} <= appenders          # TorchServe's files, as users know them
    loggers = {lg.get("name"): lg for lg in root.find("Loggers").findall("Logger")}
    assert loggers["ACCESS_LOG"].get("level") == "info"               # a line per request stays
    assert all(lg.get("additivity") == "false" for lg in loggers.values() if lg.find("AppenderRef") is not None)
    frontend = loggers["org.pytorch.serve"]
    assert (frontend.get("level"), frontend.get("additivity")) == ("info", "false")    # once, not debug
    for name in PER_REQUEST_LOGGERS:
        assert loggers[name].get("level") == "warn"
    assert root.find("Loggers").find("Root").get("level") == "warn"


def test_group_pids_lists_the_live_members_of_a_group_and_not_its_zombies():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        pgid = os.getpgid(child.pid)
        assert group_pids(pgid) == [child.pid] and group_alive(pgid)
        child.kill()
        deadline = time.monotonic() + 10
        while group_pids(pgid) and time.monotonic() < deadline:   # a zombie until reaped: not live
            time.sleep(0.05)
        assert group_pids(pgid) == []
    finally:
        child.kill()
        child.wait()
