"""TorchServe's token keys: `key_file.json`, written by TorchServe into its working directory.

It holds an "inference" key (gRPC and HTTP inference), a "management" key and an "API" key.
One reader for the launcher, the CLI (`query --token-file`) and the container healthcheck.
"""
from __future__ import annotations

import json
from pathlib import Path

from npas_serve.errors import UserError

KEY_FILE = "key_file.json"
KINDS = ("inference", "management", "API")


def read_key(key_file: Path, kind: str = "inference") -> str:
    """The `kind` key of a key_file.json; a UserError naming the file if it has none."""
    key_file = Path(key_file)
    try:
        keys = json.loads(key_file.read_text())
        return str(keys[kind]["key"])
    except FileNotFoundError:
        raise UserError(f"{key_file} does not exist; TorchServe writes it at start "
                        f"(token auth on)") from None
    except IsADirectoryError:
        raise UserError(f"{key_file} is a directory, not TorchServe's {KEY_FILE}") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{key_file} holds no {kind} key ({type(err).__name__}: {err})") from None


def run_dir_key(run_dir: Path, kind: str = "inference") -> str | None:
    """The `kind` key of the TorchServe started in `run_dir`; None while it has written no key file
    (not started yet, or token auth off)."""
    path = Path(run_dir) / KEY_FILE
    return read_key(path, kind) if path.is_file() else None
