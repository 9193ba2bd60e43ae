"""Training: every member of a family jointly on one bank.

Modules, each importing only those above it in this list (and the family below):

- `config`: `TrainConfig`, with every run-dependent default (search and unsharing epochs) resolved.
- `distributed`: the process group, batch norm over the global batch, the mean loss over ranks.
- `loop`: loss, optimiser, schedule, batches and epochs.
- `search`: what the searched groupings share (`SearchResult`, the warm-up and the members it trains).
- `gradient`, `kmeans`, `unshare`: SuperWeights' gradient grouping and coefficient unsharing,
  SSN's k-means grouping.
- `state`: the optimiser state between epochs, for --resume.
- `run`: `run_training`, the job that ties data, spec, family and checkpoints together, and `fit`,
  the same training from Python for a family already built.

From Python: ``manifest = fit(family, data, config)``, then ``save(family, directory, manifest)``
(re-exported here from `npas_serve.checkpoint`) and ``Engine.load(directory)``.

Importing this package registers the searched groupings (`gradient`, `kmeans`); the plain
ones (`shape`, `random`, `unshared`) live in `npas_serve.grouping`. Several processes:
``torchrun --nproc-per-node 2 -m npas_serve.cli train --out runs/ddp``.
"""
from npas_serve.checkpoint import save
from npas_serve.train.config import TrainConfig
from npas_serve.train.distributed import GlobalBatchNorm, process_group, sync_batchnorm
from npas_serve.train.loop import batches, family_loss, make_optimizer, train_epochs
from npas_serve.train.run import fit, run_training
from npas_serve.train.search import SearchResult
from npas_serve.train.state import TRAIN_META, TRAIN_STATE, saved_config
from npas_serve.train.unshare import Split, follow_grown_parameters, unshare_coefficients

__all__ = ["GlobalBatchNorm", "SearchResult", "Split", "TRAIN_META", "TRAIN_STATE", "TrainConfig", "batches",
           "family_loss", "fit", "follow_grown_parameters", "make_optimizer", "process_group",
           "run_training", "save", "saved_config", "sync_batchnorm", "train_epochs", "unshare_coefficients"]
