"""A training run: data, the final spec, the family, checkpoints after every epoch, resume.

Training is seeded and deterministic on CPU; a checkpoint is written after every
epoch and `resume` continues from it bit for bit. The run's spec is built once,
before the family: the user's, sized for the data (`sized_for`), with a searched
grouping's result applied; only coefficient unsharing, mid-run, derives the spec
the later checkpoints hold.

A family given as `path.py:function` (or `package.module:function`) is the user's
own: its source is registered here and travels with every checkpoint (see
`npas_serve.families.user`). `fit` is the same training from Python, for a family
already built (by `share`, `build_family` or a user builder), without a directory.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from npas_serve import registry
from npas_serve.checkpoint import MANIFEST, Manifest, load_checkpoint, save_checkpoint
from npas_serve.data import Dataset, ValidationSplit, is_path, load_dataset
from npas_serve.errors import UserError
from npas_serve.families.user import input_ndim, is_reference, read_reference, register_code
from npas_serve.family import Family, FamilySpec, build_family
from npas_serve.train import gradient, kmeans  # noqa: F401  (registers the searched groupings)
from npas_serve.train.config import TrainConfig
from npas_serve.train.distributed import sync_batchnorm
from npas_serve.train.loop import deterministic, make_optimizer, train_epochs
from npas_serve.train.search import SearchResult
from npas_serve.train.state import TRAIN_META, load_train_state, save_train_state
from npas_serve.train.unshare import follow_grown_parameters, unshare_coefficients


def prepare_data(spec: FamilySpec, data: str | None, data_seed: int | None) -> tuple[str, Dataset, tuple[int, ...]]:
    """(the data's name as the manifest stores it, the dataset shaped for the family, the data's own
    example shape: what clients will send)."""
    meta = registry.meta("family", spec.family)
    name = data or meta.get("data", None if meta.get("user_code") else "mnist1d")
    if name is None:
        raise UserError(f"a family of your own has no default data: pass --data (an .npz with x and y, "
                        f"or a registered dataset)")
    if is_path(name):   # the manifest must find the file again from any working directory
        name = str(Path(name).resolve())
    # the family's class count (--num-classes, or the manifest's on resume) is the data's too
    dataset = load_dataset(name, seed=data_seed, num_classes=spec.family_kwargs.get("num_classes"))
    return name, shaped_for(spec, dataset), dataset.input_shape


def shaped_for(spec: FamilySpec, dataset: Dataset) -> Dataset:
    """The data with the channel axis the family's first layer needs, added when the examples lack it.
    A user family's first shared layer says what it takes (a Linear first: the data as it is)."""
    meta = registry.meta("family", spec.family)
    if "input_ndim" in meta:
        return dataset.with_channels(meta["input_ndim"])
    return with_channels_for(registry.create("family", spec.family, **spec.family_kwargs).members, dataset)


def with_channels_for(members, dataset: Dataset) -> Dataset:
    ndim = input_ndim(list(members))
    return dataset if ndim is None else dataset.with_channels(ndim)


def user_family(spec: FamilySpec):
    """A spec naming `path.py:function` becomes one naming the registered builder, with its code record."""
    if not is_reference(spec.family):
        return spec, None
    source, code = read_reference(spec.family)
    return replace(spec, family=register_code(source, code, code.origin)), code


def sized_for(spec: FamilySpec, dataset: Dataset) -> FamilySpec:
    """`spec` with the data's class and channel counts, unless the spec gives them."""
    return replace(spec, family_kwargs={"num_classes": dataset.num_classes, "in_channels": dataset.input_shape[0],
                                        **spec.family_kwargs})


def search_groups(spec: FamilySpec, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                  dataset: Dataset) -> SearchResult | None:
    """A searched grouping's result (it trains a throw-away family first); None for other groupings."""
    if spec.groups is not None or not registry.meta("grouping", spec.grouping).get("trains"):
        return None
    _check_shapes(build_family(replace(spec, grouping="shape")), x, dataset)   # before the warm-up
    return registry.create("grouping", spec.grouping, spec, x, y, cfg)


def run_training(spec: FamilySpec, cfg: TrainConfig, out: Path, data: str | None = None,
                 data_seed: int | None = None, resume: bool = False, progress: bool = True,
                 rank: int = 0, world: int = 1, trust_code: bool = False) -> tuple[Family, Manifest]:
    """Train (or resume) and leave a checkpoint in `out`. Checks everything before writing anything.

    `spec.family` may be `path.py:function` (the user's code, run now: the user named it);
    resuming a checkpoint that carries code runs that code, so it needs `trust_code`.
    """
    cfg.checks()
    out = Path(out)
    code = None
    if resume:
        family, manifest = load_checkpoint(out, trust_code=trust_code)
        spec, data = manifest.spec, manifest.data
        if not (out / TRAIN_META).is_file():
            raise UserError(f"{out} has no {TRAIN_META} to resume from")
    elif (out / MANIFEST).exists():
        raise UserError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out")
    else:
        spec, code = user_family(spec)
    data, dataset, example_shape = prepare_data(spec, data, data_seed)
    held_out = manifest.validation if resume else ValidationSplit.of_data(dataset, cfg.validation, cfg.seed)
    if held_out is not None:    # None: a checkpoint from before validation splits, trained on every example
        dataset = held_out.apply(dataset)[0]
    norm = manifest.normalisation if resume else dataset.normalisation()
    x = torch.from_numpy(norm.apply(dataset.x_train))
    y = torch.from_numpy(dataset.y_train)
    with deterministic():
        if not resume:
            sized = sized_for(spec, dataset)
            found = search_groups(sized, x, y, cfg, dataset)
            family = build_family(sized if found is None else found.applied_to(sized))
            manifest = Manifest(spec=family.spec, member_names=family.names, num_exits=family.num_exits,
                                input_shape=list(dataset.input_shape), num_classes=dataset.num_classes,
                                normalisation=norm, budget_params=family.budget_params, data=data,
                                example_shape=list(example_shape), code=code, validation=held_out,
                                search=None if found is None else found.diagnostics)
        family.train()
        _check_shapes(family, x, dataset)
        manifest = _train_from(family, manifest, cfg, out, x, y, resume, progress, rank, world)
    return family, manifest


def fit(family: Family, data: Dataset | str, config: TrainConfig | None = None,
        progress: bool = False) -> Manifest:
    """Train every member of `family` jointly on its bank, in place, on `data` (a `Dataset`, a
    registered dataset name or an .npz path), and return the manifest to `save` it with.

    The Python twin of `npas-serve train`, without a directory: no checkpoint per epoch, no resume.
    Examples may come in the data's own shape ((N, L), (N, H, W)): the channel axis the family's
    first layer needs is added here, and the manifest records both shapes for the servers.
    """
    cfg = config or TrainConfig()
    cfg.checks()
    if family.spec is None:
        raise UserError("fit takes a family made by share(), build_family() or a builder of yours")
    dataset = load_dataset(data) if isinstance(data, str) else data
    shaped = with_channels_for(family.members, dataset)
    held_out = ValidationSplit.of_data(shaped, cfg.validation, cfg.seed)
    shaped = held_out.apply(shaped)[0]
    norm = shaped.normalisation()
    x, y = torch.from_numpy(norm.apply(shaped.x_train)), torch.from_numpy(shaped.y_train)
    name = str(Path(data).resolve()) if isinstance(data, str) and is_path(data) else dataset.name
    manifest = Manifest(spec=family.spec, member_names=family.names, num_exits=family.num_exits,
                        input_shape=list(shaped.input_shape), num_classes=dataset.num_classes, normalisation=norm,
                        budget_params=family.budget_params, data=name, example_shape=list(dataset.input_shape),
                        validation=held_out)
    with deterministic():
        _check_shapes(family, x, shaped)
        family.train()
        manifest = _train_from(family, manifest, cfg, None, x, y, False, progress, 0, 1)
    return manifest


def _train_from(family: Family, manifest: Manifest, cfg: TrainConfig, out: Path | None, x: torch.Tensor,
                y: torch.Tensor, resume: bool, progress: bool, rank: int, world: int) -> Manifest:
    """The epochs left, pausing once to split shared coefficients (a no-op for generators sharing none).

    Returns the manifest of the last checkpoint (after a split, its spec holds the new classes);
    `out` None (`fit`): no checkpoint is written.
    """
    torch.manual_seed(cfg.seed)
    model: nn.Module = family
    if world > 1:
        model = nn.parallel.DistributedDataParallel(sync_batchnorm(family))
    optimizer = make_optimizer(family, cfg)
    start, losses = (load_train_state(out, optimizer) if resume else (0, []))
    current = manifest

    def on_epoch(epoch: int, loss: float) -> None:
        losses.append(loss)
        if rank == 0 and out is not None:
            # one directory swap: the checkpoint and the state --resume needs land together
            save_checkpoint(out, family, current,
                            also=lambda tmp: save_train_state(tmp, optimizer, epoch, cfg, losses))

    split_at = cfg.split_epoch()
    for end in ([split_at] if 0 < split_at < cfg.epochs and start <= split_at else []) + [cfg.epochs]:
        train_epochs(family, model, optimizer, x, y, cfg, start, on_epoch, progress, rank, world, end)
        start = end
        if end == split_at:
            # the checkpoint of this epoch is from before the split, so a resume from it splits again
            split = unshare_coefficients(family, x, y, cfg)
            if split is None:
                continue
            spec = current.spec
            current = replace(current, spec=replace(spec, generator_kwargs={
                **spec.generator_kwargs, "coefficient_ids": split.coefficient_ids}),
                search={**(current.search or {}), "unshare": split.diagnostics})
            follow_grown_parameters(optimizer, split.grown)
            if world > 1:
                model = nn.parallel.DistributedDataParallel(family)   # parameters changed shape
    return current


def _check_shapes(family: Family, x: torch.Tensor, dataset: Dataset) -> None:
    """Fail before training, with a clear message, when the data does not fit the family."""
    try:
        with torch.no_grad():
            family.eval()
            family(x[:2])
            family.train()
    except RuntimeError as err:
        raise UserError(f"data '{dataset.name}' with examples of shape {dataset.input_shape} does not fit "
                        f"this family: {str(err).splitlines()[0]}") from None
