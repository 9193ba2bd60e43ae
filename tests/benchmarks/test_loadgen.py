"""The load generator measures the server, not its own process's pauses."""
from __future__ import annotations

import gc

from tests.support.loadgen import frozen_heap


def test_a_load_runs_with_the_callers_objects_out_of_the_collectors_reach():
    ballast = [[i] for i in range(10_000)]           # what a benchmark keeps from earlier runs
    seen = {}

    @frozen_heap
    def run():
        seen["frozen"] = gc.get_freeze_count()

    run()
    assert seen["frozen"] >= len(ballast)            # a full collection would not walk them
    assert gc.get_freeze_count() == 0                # and the process is as it was afterwards
