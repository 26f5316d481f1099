"""The monitor's retrain recommendation agrees with its numbers: a verdict with enough ratings, and with
too few, how many more are needed."""

from __future__ import annotations

from assistant.monitoring.report import MonitorSettings, _recommend

NO_DRIFT = {"current": None}


def _quality(rated: int, bad: int) -> dict:
    return {"adapter_version": "v1", "rated": rated, "bad": bad, "bad_rate": round(bad / rated, 4) if rated else None}


def test_bad_rate_over_the_threshold_with_enough_ratings_recommends_retraining():
    s = MonitorSettings()
    rec = _recommend(_quality(s.min_feedback, s.min_feedback), NO_DRIFT, s)
    assert rec["retrain"] and rec["ratings_needed"] == 0
    assert f"{s.min_feedback} of the last {s.min_feedback} rated answers" in rec["reason"]


def test_too_few_ratings_say_how_many_more_are_needed():
    s = MonitorSettings()
    rec = _recommend(_quality(2, 2), NO_DRIFT, s)       # 100% bad, but only 2 ratings
    assert not rec["retrain"]
    assert rec["ratings_needed"] == s.min_feedback - 2
    assert "within thresholds" not in rec["reason"]
    assert f"{s.min_feedback - 2} more needed" in rec["reason"] and "100%" in rec["reason"]


def test_good_ratings_need_no_retraining():
    s = MonitorSettings()
    rec = _recommend(_quality(10, 0), NO_DRIFT, s)
    assert not rec["retrain"] and rec["ratings_needed"] == 0 and "within thresholds" in rec["reason"]
