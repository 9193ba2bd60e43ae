#!/usr/bin/env bash
# Install what npas-serve needs on a fresh machine; fast no-op when nothing changed.
#   - Java 17 for TorchServe's frontend (Debian package, only where missing)
#   - promtool and prometheus for the deploy tests (Debian package `prometheus`, only where missing;
#     without apt-get those tests skip and say why)
#   - a virtualenv in .venv with torch==2.13.0 (CPU build) and the project (editable, with dev extras)
set -euo pipefail
cd "$(dirname "$0")/.."

java_major() { java -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print v[1]; exit}'; }
if ! command -v java >/dev/null || [ "$(java_major)" -lt 17 ]; then
  echo "setup: installing Java 17 (openjdk-17-jre-headless)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openjdk-17-jre-headless >/dev/null
fi

if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  if command -v apt-get >/dev/null; then
    echo "setup: installing Prometheus (promtool) for the deploy tests"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "setup: no apt-get; install Prometheus (promtool) yourself, or the deploy tests that need it skip"
  fi
fi

PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PY"
  "$PY" -m venv .venv
fi
stamp=.venv/.npas-setup-stamp
want=$(cat pyproject.toml setup.py proto/*.proto 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing dependencies into .venv (first time: a few minutes)"
  # exactly this version: a local CPU build is served for it; anything else pulls CUDA wheels
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
  .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
  echo "$want" > "$stamp"
fi
