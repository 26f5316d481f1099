"""The canary's decision rule on simulated ratings (thousands of seeded rollouts, no model): read after
every rating, it rarely decides when both arms serve the same version (A/A), and finds a 10-point
difference in bad-answer rate within a few hundred ratings, in the right direction. Its verdict is said in
words, with what would change it."""

from __future__ import annotations

import numpy as np
import pytest

from assistant.errors import InvalidSetting
from assistant.monitoring.canary import INCONCLUSIVE, PROMOTE, ROLL_BACK, Arm, CanarySettings, decide, simulate

RUNS = 2000
SETTINGS = CanarySettings()
MAX_FALSE_DECISIONS = 0.05           # A/A rollouts that end in a promotion or a roll-back
MAX_MEDIAN_RATINGS = 200             # the canary arm's rated answers to a decision at a 10-point difference


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.4])
def test_the_same_version_on_both_arms_stays_inconclusive(rate):
    verdict, _ = simulate(rate, rate, SETTINGS, RUNS, seed=7)
    false = np.isin(verdict, [PROMOTE, ROLL_BACK]).mean()
    assert false <= MAX_FALSE_DECISIONS, false
    assert (verdict == INCONCLUSIVE).mean() >= 1 - MAX_FALSE_DECISIONS


@pytest.mark.parametrize("baseline, canary, right, wrong", [(0.2, 0.3, ROLL_BACK, PROMOTE), (0.3, 0.2, PROMOTE, ROLL_BACK)])
def test_a_ten_point_difference_is_found_in_the_right_direction(baseline, canary, right, wrong):
    verdict, at = simulate(baseline, canary, SETTINGS, RUNS, seed=11)
    assert (verdict == right).mean() >= 0.9 and (verdict == wrong).mean() <= 0.001
    assert np.median(at[verdict == right]) <= MAX_MEDIAN_RATINGS


def test_the_verdict_says_why_and_what_would_change_it():
    early = decide(Arm(100, 20), Arm(10, 2), SETTINGS)
    assert early["verdict"] == "wait" and "20 more on the canary" in early["next"]
    worse = decide(Arm(300, 60), Arm(60, 30), SETTINGS)
    assert worse["verdict"] == "roll back" and "canary 50% of 60 rated" in worse["why"]
    assert decide(Arm(1000, 300), Arm(300, 30), SETTINGS)["verdict"] == "promote"
    unsure = decide(Arm(100, 20), Arm(50, 10), SETTINGS)
    assert unsure["verdict"] == "wait" and "99.9% sure" in unsure["next"]
    assert decide(Arm(2000, 400), Arm(500, 100), SETTINGS)["verdict"] == "inconclusive"
    late = decide(Arm(100, 20), Arm(50, 10), SETTINGS, hours=SETTINGS.max_hours)
    assert late["verdict"] == "inconclusive" and "168 hours" in late["why"]


@pytest.mark.parametrize("field, value", [("share", 0.0), ("share", 1.0), ("min_rated", 0), ("max_rated", 5),
                                          ("max_hours", 0), ("confidence", 0.4)])
def test_a_bad_setting_names_its_field(field, value):
    with pytest.raises(InvalidSetting) as e:
        CanarySettings(**{field: value})
    assert e.value.param.startswith("canary.") and str(value) in e.value.message
