"""docs/own-model.md's worked example, run as written: the user's own CNN family on (N, 8, 8) digits,
trained, archived, served by TorchServe and by the embedded server, queried with (B, 8, 8) arrays.

The commands are read from the page itself (the block after its `worked-example` marker), so the page
cannot drift from what is tested; the test adds only free ports and the target to reach them.
"""
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.support.servers import free_port, running_embedded

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "own-model.md"
TS_PORT_FLAGS = ("--grpc-port", "--grpc-management-port", "--http-port", "--management-port", "--metrics-port")


def blocks(text: str, after: str = "") -> list[list[str]]:
    """The bash blocks of the page (from `after` on), as lists of command lines."""
    text = text[text.index(after):] if after else text
    return [[line.strip() for line in body.splitlines() if line.strip()]
            for body in re.findall(r"```bash\n(.*?)```", text, re.S)]


def argv(line: str) -> list[str]:
    words = shlex.split(line.rstrip("&").strip())
    if words[0] == "python":
        return [sys.executable, *words[1:]]
    assert words[0] == "npas-serve", line
    return [sys.executable, "-m", "npas_serve.cli", *words[1:]]


def run(words: list[str], cwd: Path, timeout: float = 900) -> str:
    done = subprocess.run(words, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{shlex.join(words)}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


def predictions(stdout: str) -> list[int]:
    return [int(v) for v in re.search(r"final: predictions \[([^\]]*)\]", stdout).group(1).split(",")]


def test_the_worked_example_runs_as_written(tmp_path):
    if shutil.which("java") is None:
        pytest.skip("java is not installed; scripts/setup.sh installs it")
    worked, embedded = blocks(PAGE.read_text(), after="<!-- worked-example")[:2]
    (tmp_path / "examples").symlink_to(ROOT / "examples")       # a fresh clone's layout, runs/ kept in tmp
    ports = {flag: free_port() for flag in TS_PORT_FLAGS}
    target = ["--target", f"127.0.0.1:{ports['--grpc-port']}"]
    answers = []
    try:
        for line in worked:
            words = argv(line)
            if words[3:5] == ["torchserve", "start"]:
                words += [str(w) for flag, port in ports.items() for w in (flag, port)] + ["--timeout", "300"]
            if words[3:4] == ["query"]:
                words += target
            stdout = run(words, tmp_path)
            if words[3:4] == ["query"]:
                answers.append(predictions(stdout))
    finally:
        subprocess.run(argv("npas-serve torchserve stop"), cwd=tmp_path, capture_output=True, timeout=120)
    report = json.loads((tmp_path / "runs/digits-own/ckpt/report.json").read_text())
    last = max(e["exit"] for e in report["exits"])
    best = max(e["accuracy"] for e in report["exits"] if e["exit"] == last)
    assert best > 0.90, report["exits"]
    assert report["num_test"] == 360                              # the held-out digits of make_data.py
    labels = np.load(tmp_path / "runs/digits-own/query_labels.npy").tolist()
    assert np.load(tmp_path / "runs/digits-own/query.npy").shape == (8, 8, 8)
    assert len(answers) == 1 and sum(p == y for p, y in zip(answers[0], labels)) >= 7, (answers, labels)

    serve, query = map(argv, embedded)
    assert serve[3:5] == ["serve", "runs/digits-own/ckpt"]
    with running_embedded(tmp_path / serve[4], args=serve[5:]) as launched:    # the page's flags: --trust-code
        assert predictions(run(query + ["--target", launched.target], tmp_path, 120)) == answers[0]
