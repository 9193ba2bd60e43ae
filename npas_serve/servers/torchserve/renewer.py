"""Renew TorchServe's token keys before they expire, for as long as TorchServe runs.

TorchServe 0.12's inference and management keys expire `token_expiration_min` after they
were made (an hour by default); its API key does not, and `POST /token?type=...` with it
on the management port makes a new key and rewrites key_file.json. Without renewal a
running service refuses every client, its own CLI included, after an hour. Clients read
the key from key_file.json for every call (`query --token-file`; `Client` takes a callable
token and calls it per call), so they follow the renewal.

Run by `launcher.start` inside TorchServe's process group:

    python -m npas_serve.servers.torchserve.renewer RUN_DIR HOST MANAGEMENT_PORT
"""
from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from npas_serve.servers.torchserve.keys import KEY_FILE

RENEWED = ("management", "inference")
RENEW_AT = 0.5            # renew a key when less than half of its lifetime is left
POLL_S = 1.0


def expiry_unix(text: str) -> float:
    """Java's Instant.toString (`2026-11-30T23:59:59.123456789Z`) as Unix seconds."""
    text = text.strip().rstrip("Z")
    whole, _, fraction = text.partition(".")
    stamp = datetime.fromisoformat(whole).replace(tzinfo=timezone.utc).timestamp()
    return stamp + (float(f"0.{fraction}") if fraction else 0.0)


def read_keys(run_dir: Path) -> dict | None:
    """key_file.json, or None while TorchServe has not (completely) written it."""
    try:
        keys = json.loads((Path(run_dir) / KEY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return keys if isinstance(keys, dict) and all(k in keys for k in (*RENEWED, "API")) else None


def lifetime_s(run_dir: Path) -> float:
    """The keys' lifetime that config.properties gives TorchServe (its default when absent)."""
    try:
        props = dict(line.split("=", 1) for line in (Path(run_dir) / "config.properties").read_text().splitlines()
                     if "=" in line)
        return float(props.get("token_expiration_min", 60)) * 60
    except (OSError, ValueError):
        return 3600.0


def due(keys: dict, lifetime: float, now: float) -> list[str]:
    """The kinds whose key has less than RENEW_AT of its lifetime left (or an unreadable expiry)."""
    kinds = []
    for kind in RENEWED:
        try:
            left = expiry_unix(keys[kind]["expiration time"]) - now
        except (KeyError, TypeError, ValueError):
            left = 0.0
        if left < lifetime * RENEW_AT:
            kinds.append(kind)
    return kinds


def renew(host: str, port: int, api_key: str, kind: str) -> None:
    req = urllib.request.Request(f"http://{host}:{port}/token?type={kind}", method="POST")
    req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()


def renew_due(run_dir: Path, host: str, port: int) -> list[str]:
    """Renew the keys of the TorchServe in `run_dir` that are due; the kinds renewed.

    Also called by the container healthcheck, where TorchServe runs without this module's loop."""
    keys = read_keys(run_dir)
    if keys is None:
        return []
    renewed = []
    for kind in due(keys, lifetime_s(run_dir), time.time()):
        try:
            renew(host, port, keys["API"]["key"], kind)
            renewed.append(kind)
        except (urllib.error.URLError, OSError) as err:
            print(f"renewer: renewing the {kind} key failed ({err}); retrying", flush=True)
    return renewed


def main(argv: list[str]) -> int:
    run_dir, host, port = Path(argv[0]), argv[1], int(argv[2])
    parent = os.getppid()
    while os.getppid() == parent:          # TorchServe (our parent shell became it) still runs
        for kind in renew_due(run_dir, host, port):
            print(f"renewer: renewed the {kind} key", flush=True)
        time.sleep(POLL_S)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
