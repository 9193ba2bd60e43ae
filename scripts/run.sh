#!/usr/bin/env bash
# Set up, train the default model if none exists, archive it, serve it with TorchServe
# (token auth on) and answer one query over gRPC. TorchServe keeps running afterwards;
# stop it with: .venv/bin/npas-serve torchserve stop
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cli=.venv/bin/npas-serve
model=${NPAS_MODEL_DIR:-runs/default}

if [ ! -f "$model/manifest.json" ]; then
  echo "== training the default family into $model (a few minutes on 2 cores)"
  $cli train --out "$model"
elif ! grep -q '"report": {' "$model/manifest.json"; then
  $cli eval "$model"
fi
echo "== archiving $model"
$cli archive "$model" --name npas --model-store model_store
echo "== starting TorchServe"
$cli torchserve stop >/dev/null || true
$cli torchserve start --model-store model_store
echo "== ensemble of 3 members"
$cli query --token-file .torchserve/key_file.json --ensemble-size 3
echo "== anytime (TorchServe answers each call once; npas-serve serve streams one answer per exit)"
$cli query --token-file .torchserve/key_file.json --anytime
echo "== under a 5 ms budget"
$cli query --token-file .torchserve/key_file.json --budget-ms 5
echo "TorchServe is still serving on 127.0.0.1:7070; stop it with: $cli torchserve stop"
