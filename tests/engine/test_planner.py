"""The planner's choices, on a cost model with known costs (no timing involved)."""
from __future__ import annotations

import time

import numpy as np
import pytest

from npas_serve.engine.planner import SAFETY, CostModel, Planner, Step, finishes_within, fits_with_margin


def planner(costs_ms=((1, 1, 1), (2, 2, 2), (4, 4, 4)), acc=((0.5, 0.7, 0.9), (0.6, 0.8, 0.95), (0.6, 0.9, 0.99))):
    cost = CostModel(len(costs_ms), len(costs_ms[0]))
    cost.intercept = costs_ms
    acc = np.array(acc)
    order = list(np.argsort(-acc[:, -1]))
    return Planner(cost, acc[:, -1], acc, order)


def test_ensemble_without_budget_takes_the_best_members_first():
    p = planner()
    assert p.ensemble(1, 2, None, None).members == [2, 1]
    assert p.ensemble(1, None, None, None).members == [2, 1, 0]


def test_ensemble_plan_shrinks_as_the_budget_shrinks():
    p = planner()
    sizes = [len(p.ensemble(1, None, None, b).members) for b in (1000, 20, 6, 0.1)]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] == 3 and sizes[-1] == 1


def test_tight_budget_runs_the_fastest_member():
    assert planner().ensemble(1, None, None, 0.1).members == [0]


def test_explicit_members_are_kept():
    assert planner().ensemble(1, None, [1, 0], 0.1).members == [1, 0]


def test_anytime_picks_the_most_accurate_exit_that_fits():
    p = planner()
    full = p.anytime(1, None, None, None)
    assert full.members == [2] and full.last_exit == 2
    fits_two = p.anytime(1, None, None, 10)        # 10 * 0.8 = 8 ms: member 2 up to exit 1, or member 1's all
    assert fits_two.predicted_ms <= 8
    assert p.exit_accuracy[fits_two.members[0], fits_two.last_exit] == 0.95
    assert p.anytime(1, None, 1, None).last_exit == 1
    assert p.anytime(1, None, None, 0.01).last_exit == 0


def test_budget_rules_count_the_time_already_spent_and_keep_a_margin():
    started = time.perf_counter()
    assert finishes_within(50, started, 100)
    assert not finishes_within(50, started - 0.06, 100)      # 60 ms already spent
    assert fits_with_margin(0.9 * SAFETY * 100, started, 100)       # 90 ms of the 100 left, margin included
    assert not fits_with_margin(1.1 * SAFETY * 100, started, 100)   # 88 ms fits alone, not with the margin
    assert fits_with_margin(1e9, started, None)              # no budget: anything fits


def test_observations_move_predictions_toward_measurements():
    cost = CostModel(1, 1)
    cost.intercept = [[1.0]]
    for _ in range(100):
        cost.observe(Step(0, 0), 1, 3.0)
    assert abs(cost.predict(Step(0, 0), 1) - 3.0) < 0.05


def test_a_rounds_overhead_is_learnt_and_counted_once_per_member():
    p = planner()
    plan = p.ensemble(1, 2, None, None)
    before = p.first_answer_ms(plan, 1), p.cost.member_ms(0, 1)
    for _ in range(100):
        p.cost.observe_round(0.5)
    assert abs(p.cost.round_ms - 0.5) < 0.01
    assert p.cost.member_ms(0, 1) == before[1] + p.cost.round_ms           # once per member, not per stage
    assert p.first_answer_ms(plan, 1) == before[0] + p.cost.round_ms
    assert p.ensemble(1, 2, None, None).predicted_ms == plan.predicted_ms + 2 * p.cost.round_ms


def test_from_report_reads_accuracies_and_order_by_member_name():
    from npas_serve.evaluate import ExitScore, ParamCount, Report

    exits = [ExitScore(acc, 0.0, 0.0, member=name, exit=e, flops=1)
             for name, row in (("b", (0.2, 0.4)), ("a", (0.3, 0.9))) for e, acc in enumerate(row)]
    report = Report("d", 1, ["a", "b"], exits, [], ParamCount(1, 0, {}, {}, 1))
    p = Planner.from_report(CostModel(2, 2), ["b", "a"], report)
    assert p.member_order == [1, 0] and p.final_accuracy == [0.4, 0.9]
    assert p.exit_accuracy.tolist() == [[0.2, 0.4], [0.3, 0.9]]


def test_without_a_report_members_count_alike_and_deeper_exits_better():
    p = Planner.from_report(CostModel(2, 3), ["a", "b"], None)
    assert p.member_order == [0, 1]
    assert p.exit_accuracy.tolist() == [[1 / 3, 2 / 3, 1.0]] * 2


def test_the_cost_tables_change_only_whole_so_predictions_follow():
    cost = CostModel(2, 2)
    cost.slope = [[1.0, 2.0], [3.0, 4.0]]
    assert cost.predict(Step(1, 1), 10) == 40.0 and cost.member_ms(1, 10) == 70.0
    with pytest.raises(ValueError):
        cost.slope[1, 1] = 0.0               # in place, the predictions would not follow: refused
    cost.correction = [[1.0, 1.0], [1.0, 0.5]]
    assert cost.predict(Step(1, 1), 10) == 20.0 and cost.member_ms(1, 10, upto=0) == 30.0
