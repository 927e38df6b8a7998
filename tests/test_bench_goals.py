"""The benches' goal records (bench/_common.goal): what bench/results/*.json say is met."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("bench_common", Path(__file__).resolve().parents[1] / "bench/_common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def test_a_goal_is_judged_on_the_value_it_records():
    # Two ten-seed mean accuracies 0.3 points apart: float residue makes it 0.30000000000000027.
    at_limit = common.goal("gap", 100 * abs(0.8013 - 0.7983), 0.3, False)
    assert at_limit["value"] == 0.3 and at_limit["met"]
    assert not common.goal("gap", 0.3001, 0.3, False)["met"]
    assert common.goal("ratio", 0.969951, 0.97, True)["met"] and not common.goal("ratio", 0.96994, 0.97, True)["met"]
    assert common.goal("ratio", 4.43, 4.0, True) == {"name": "ratio", "value": 4.43, "target": 4.0,
                                                    "higher_is_better": True, "met": True}
