import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from npas_serve.checkpoint import MANIFEST, load_checkpoint, read_manifest
from npas_serve.data import ValidationSplit, load_dataset
from npas_serve.ensemble import Temperatures, calibrate, combine, nll
from npas_serve.evaluate import (REPORT, Report, count_flops, evaluate, exit_probs, param_count, scores,
                                 summary_lines, write_report)
from npas_serve.family import FamilySpec, Member, build_family, share


# --- scores -----------------------------------------------------------------------------------------

def test_scores_of_perfect_predictions():
    y = torch.tensor([0, 1, 2, 1])
    s = scores(torch.eye(3)[y], y)
    assert s.accuracy == 1.0
    assert s.nll < 1e-6 and s.ece < 1e-6


def test_scores_known_nll_accuracy_and_ece():
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.9, 0.1]])
    y = torch.tensor([0, 1, 1, 0])
    s = scores(probs, y)
    assert s.accuracy == pytest.approx(0.75)
    assert s.nll == pytest.approx(-(math.log(0.8) + math.log(0.4) + math.log(0.7) + math.log(0.9)) / 4, rel=1e-6)
    # confidences 0.8, 0.6, 0.7, 0.9 fall in four different bins of width 1/15; ECE = mean |conf - correct|
    assert s.ece == pytest.approx((0.2 + 0.6 + 0.3 + 0.1) / 4, rel=1e-5)


def test_scores_confident_and_wrong_is_badly_calibrated():
    y = torch.tensor([0, 0])
    s = scores(torch.tensor([[0.01, 0.99], [0.01, 0.99]]), y)
    assert s.accuracy == 0 and s.ece == pytest.approx(0.99) and s.nll == pytest.approx(-math.log(0.01))


# --- FLOPs and parameters ---------------------------------------------------------------------------

def test_count_flops_matches_a_hand_count():
    """Two exits, length-8 input: conv(1->4, k3) 4*8*3 MACs, conv(4->8, k3, stride 2) 8*4*12,
    heads Linear(4,3) and Linear(8,3). A later exit does not pay for an earlier head."""
    stages = [nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv1d(4, 8, 3, stride=2, padding=1, bias=False), nn.ReLU())]
    heads = [nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(w, 3)) for w in (4, 8)]
    family = share([Member(stages, heads)], budget=1.0)
    stem, deep = 4 * 8 * 3, 8 * 4 * 12
    assert count_flops(family, (1, 8)) == [[2 * (stem + 12), 2 * (stem + deep + 24)]]
    assert all(layer.weight is None for layer in family.modules() if hasattr(layer, "weight_shape"))


def test_count_flops_of_a_plain_linear_member():
    family = share([nn.Linear(5, 3), nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))])
    assert count_flops(family, (5,)) == [[2 * 15], [2 * (35 + 21)]]


def test_default_family_bank_is_smaller_than_one_member_on_average():
    family = build_family(FamilySpec(family="mnist1d-resnet", family_kwargs={"num_classes": 10, "in_channels": 1}))
    p = param_count(family)
    shared = family.member_shared_numel()
    assert len(p.unshared) >= 3
    assert p.bank == family.generator.bank_numel() <= p.budget == int(0.85 * max(shared))
    assert p.bank <= p.unshared_total / len(p.unshared)
    assert p.bank <= max(shared)               # the largest member's unshared conv parameters
    assert p.unshared_total == sum(shared) + sum(p.private.values())
    assert p.coefficients == sum(c.numel() for c in family.generator.coefficients)
    assert p.resident < p.unshared_total


# --- the report -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def evaluated(trained_tiny, tmp_path_factory):
    import shutil

    directory = shutil.copytree(trained_tiny, tmp_path_factory.mktemp("eval") / "ckpt")
    family, manifest = load_checkpoint(directory)
    dataset = load_dataset("mnist1d").with_channels(1)
    report = evaluate(family, manifest, dataset)
    write_report(report, manifest, directory)
    return directory, family, report


def test_report_has_every_member_exit_and_ensemble_size(evaluated):
    _, family, report = evaluated
    names = family.names
    assert report.num_test == 1000 and report.data == "mnist1d"
    assert sorted((e.member, e.exit) for e in report.exits) == sorted((n, e) for n in names for e in range(3))
    assert [e.size for e in report.ensembles] == [1, 2, 3]
    assert sorted(report.member_order) == sorted(names)
    for e in report.ensembles:
        assert e.members == report.member_order[:e.size]
        assert e.flops == sum(report.exit_score(m, 2).flops for m in e.members)
    assert report.ensembles[0].accuracy == report.exit_score(report.member_order[0], 2).accuracy
    for name in names:   # deeper exits cost more
        flops = [report.exit_score(name, e).flops for e in range(3)]
        assert flops == sorted(flops) and len(set(flops)) == 3
    for s in (*report.exits, *report.ensembles):
        assert 0 <= s.accuracy <= 1 and s.nll >= 0 and 0 <= s.ece <= 1


def test_the_trained_family_has_learned(evaluated):
    _, _, report = evaluated
    best = report.exit_score(report.member_order[0], 2)
    assert best.accuracy > 0.5          # ten classes: chance is 0.1
    assert max(e.accuracy for e in report.ensembles) > 0.5


def test_report_files_and_manifest(evaluated):
    directory, _, report = evaluated
    on_disk = json.loads((directory / REPORT).read_text())
    assert on_disk == report.to_dict()
    assert Report.from_dict(on_disk) == report
    for png in ("ensemble.png", "anytime.png"):
        assert (directory / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_manifest(directory).report == on_disk
    assert json.loads((directory / MANIFEST).read_text())["report"]["member_order"] == report.member_order
    load_checkpoint(directory)        # writing the report kept the checkpoint loadable


def test_validation_chooses_order_planner_accuracies_and_temperatures(evaluated):
    """The manifest's held-out training examples order the members and fit the temperatures;
    the test set only scores (calibrated, with the uncalibrated figures beside)."""
    directory, family, report = evaluated
    manifest = read_manifest(directory)
    split = manifest.validation
    assert split is not None and report.num_validation == split.size > 0
    final = {n: report.exit_score(n, 2) for n in family.names}
    assert report.member_order == sorted(family.names, key=lambda n: (-final[n].val_accuracy, final[n].flops))
    assert all(report.planning_accuracy(n, e) == report.exit_score(n, e).val_accuracy
               for n in family.names for e in range(3))
    # the temperatures the engine reads are the fitted ones, and they minimise validation NLL
    temps = Temperatures.from_report(manifest.report)
    assert temps.ensemble == [e.temperature for e in report.ensembles]
    dataset = load_dataset("mnist1d").with_channels(1)
    _, xv, yv = split.apply(dataset)
    probs = exit_probs(family, torch.from_numpy(manifest.normalisation.apply(xv)))
    yv = torch.from_numpy(yv)
    for e in report.ensembles:
        order = [family.names.index(n) for n in e.members]
        held = combine(list(probs[order, 2])).probabilities
        assert nll(calibrate(held, e.temperature), yv) <= nll(held, yv) + 1e-6
        assert e.ece_before is not None and e.nll_before is not None and e.temperature != 1.0
    assert "validation examples" in "\n".join(summary_lines(report))


def test_the_validation_split_is_seeded_disjoint_and_held_out_of_training():
    dataset = load_dataset("mnist1d")
    split = ValidationSplit.of_data(dataset, 0.1, seed=3)
    train, xv, yv = split.apply(dataset)
    assert len(yv) == split.size == round(0.1 * len(dataset.y_train)) and len(train.y_train) + len(yv) == split.of
    again = ValidationSplit.of_data(dataset, 0.1, seed=3).apply(dataset)
    assert np.array_equal(again[1], xv)
    other = ValidationSplit.of_data(dataset, 0.1, seed=4).apply(dataset)
    assert not np.array_equal(other[1], xv)
    rows = {r.tobytes() for r in train.x_train}
    assert not any(r.tobytes() in rows for r in xv)          # nothing held out is trained on
    assert np.array_equal(train.x_test, dataset.x_test)
