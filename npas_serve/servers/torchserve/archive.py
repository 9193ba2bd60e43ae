"""`npas-serve archive`: pack a checkpoint into model_store/<name>.mar for TorchServe.

The .mar holds the handler file of this package (`npas_handler.py`, which imports
the installed handler), the checkpoint's tensor file and manifest, and the engine
config. A checkpoint of a user family also carries its builder's source; it is
packed only with `trust_code` (`archive --trust-code`), which is then written into
the engine config, so the TorchServe worker runs the code because the archive's
builder said so, and refuses it otherwise.
The checkpoint is verified (sha256, rebuildable family) before anything is written.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from npas_serve.checkpoint import MANIFEST, TENSORS, load_checkpoint
from npas_serve.families.user import CODE_FILE
from npas_serve.engine import EngineConfig
from npas_serve.errors import UserError

HANDLER = Path(__file__).resolve().with_name("npas_handler.py")
CONFIG = "npas_config.json"   # the engine config in a .mar: model name, cache bound, limits
MODEL_CONFIG = "model-config.yaml"
# TorchServe's own batching: the frontend hands a worker up to BATCH_SIZE queued calls at once,
# waiting at most MAX_BATCH_DELAY_MS for a batch to fill; the engine runs them as one batch.
# The delay is short because an idle server pays it on every call.
BATCH_SIZE = 32
MAX_BATCH_DELAY_MS = 2


def build_archive(checkpoint: Path, name: str = "npas", model_store: Path = Path("model_store"),
                  version: str = "1", config: EngineConfig | None = None, workers: int = 1,
                  trust_code: bool = False, batch_size: int = BATCH_SIZE,
                  max_batch_delay_ms: int = MAX_BATCH_DELAY_MS) -> Path:
    checkpoint, model_store = Path(checkpoint), Path(model_store)
    # refuses a tampered or mismatched checkpoint (or one carrying untrusted code) before packing it
    _, manifest = load_checkpoint(checkpoint, trust_code=trust_code)
    config = config or EngineConfig()
    _check_config(config)         # a .mar whose worker cannot start would crash-loop under TorchServe
    if batch_size < 1 or max_batch_delay_ms < 0:
        raise UserError(f"TorchServe batching out of range: batch_size {batch_size} (>= 1), "
                        f"max_batch_delay_ms {max_batch_delay_ms} (>= 0)")
    config.model_name, config.model_version = name, version
    config.trust_code = trust_code and manifest.code is not None
    model_store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        engine_config = asdict(config)
        engine_config["warmup_batch_sizes"] = list(config.warmup_batch_sizes)
        (tmp / CONFIG).write_text(json.dumps(engine_config, indent=2))
        (tmp / MODEL_CONFIG).write_text(
            f"minWorkers: {workers}\nmaxWorkers: {workers}\nbatchSize: {batch_size}\n"
            f"maxBatchDelay: {max_batch_delay_ms}\nresponseTimeout: 120\n")
        export = tmp / "export"
        export.mkdir()
        extra = [checkpoint / TENSORS, checkpoint / MANIFEST, tmp / CONFIG]
        if manifest.code is not None:
            extra.append(checkpoint / CODE_FILE)
        cmd = [sys.executable, "-m", "model_archiver.model_packaging",
               "--model-name", name, "--version", version, "--handler", str(HANDLER),
               "--extra-files", ",".join(str(p) for p in extra), "--config-file", str(tmp / MODEL_CONFIG),
               "--export-path", str(export), "--force"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        built = export / f"{name}.mar"
        if done.returncode != 0 or not built.is_file():
            raise UserError(f"torch-model-archiver failed: {(done.stderr or done.stdout).strip()[-500:]}")
        target = model_store / f"{name}.mar"
        shutil.move(str(built), target)     # complete file only: the archive is built elsewhere first
    return target


def extract_archive(mar: Path, into: Path) -> Path:
    """Unpack the checkpoint files of a .mar (for `npas-serve serve FILE.mar`): the family's code
    too, when it has some, which `serve` runs only with its own --trust-code."""
    import zipfile

    try:
        with zipfile.ZipFile(mar) as zf:
            names = set(zf.namelist())
            for wanted in (TENSORS, MANIFEST, CONFIG):
                if wanted not in names:
                    raise UserError(f"{mar} is not an npas-serve archive: {wanted} is missing")
                _extract_bounded(zf, wanted, Path(into))
            if CODE_FILE in names:
                _extract_bounded(zf, CODE_FILE, Path(into))
    except zipfile.BadZipFile:
        raise UserError(f"{mar} is not a .mar (zip) archive") from None
    return Path(into)


# A safetensors file of trained weights barely compresses; a zip bomb compresses a thousandfold.
MAX_RATIO = 20
SLACK_BYTES = 1 << 20


def _extract_bounded(zf, name: str, into: Path) -> None:
    """Extract one member, refusing it by its declared sizes first and stopping at them while
    writing, so a zip bomb costs neither disk nor time (zipfile alone trusts the headers)."""
    info = zf.getinfo(name)
    if info.file_size > MAX_RATIO * info.compress_size + SLACK_BYTES:
        raise UserError(f"{name} in the archive expands {info.compress_size} bytes to {info.file_size}: "
                        "not a packed checkpoint (a zip bomb?)")
    written = 0
    with zf.open(info) as src, open(into / name, "wb") as dst:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            written += len(chunk)
            if written > info.file_size:
                raise UserError(f"{name} in the archive holds more than the {info.file_size} bytes it declares")
            dst.write(chunk)


def _check_config(config: EngineConfig) -> None:
    if (config.cache_bytes < 0 or config.max_batch < 1 or config.max_payload_bytes < 1 or config.batch_examples < 1
            or config.batch_delay_ms < 0 or config.threads < 0
            or (config.queue_examples is not None and config.queue_examples < 1)):
        raise UserError(f"engine config out of range: cache_bytes {config.cache_bytes} (>= 0), max_batch "
                        f"{config.max_batch} (>= 1), max_payload_bytes {config.max_payload_bytes} (>= 1), "
                        f"batch_examples {config.batch_examples} (>= 1), batch_delay_ms {config.batch_delay_ms} "
                        f"(>= 0), threads {config.threads} (>= 0), queue_examples {config.queue_examples} (>= 1 or null)")
