"""The canary's decision rule on simulated ratings (assistant/monitoring/canary.py): thousands of rollouts,
rated one answer at a time, the rule read after every rating.

- `canary_false_decision_rate`: with the same version on both arms (A/A), the share of rollouts that end
  in a promotion or a roll-back, the worst over bad-answer rates 10%, 20% and 40% (target <= 0.05);
- `canary_ratings_to_decision`: the median rated answers of the canary arm until the rule rolls back a
  canary 10 points worse (20% -> 30% bad answers), or promotes one 10 points better; the larger of the two
  (target <= 200). Both at the default share (20%) and settings. No model, no timing: the figures do not
  depend on the machine."""

from __future__ import annotations

import numpy as np

from common import print_table, sized

RUNS = sized(4000, 200)
AA_RATES = (0.1, 0.2, 0.4)
DIFFERENCE = (0.2, 0.3)          # bad-answer rates of the current version and of a worse canary


def run() -> dict:
    from assistant.monitoring.canary import PROMOTE, ROLL_BACK, CanarySettings, simulate
    settings = CanarySettings()
    rows, false_rates = [], []
    for rate in AA_RATES:
        verdict, _ = simulate(rate, rate, settings, RUNS, seed=1)
        false = float(np.isin(verdict, [PROMOTE, ROLL_BACK]).mean())
        false_rates.append(false)
        rows.append((f"A/A at {rate:.0%} bad", f"{false:.3f} decided (promote {np.mean(verdict == PROMOTE):.3f}, "
                                               f"roll back {np.mean(verdict == ROLL_BACK):.3f})"))
    medians = []
    for current, canary, right, word in ((*DIFFERENCE, ROLL_BACK, "rolled back"),
                                         (*DIFFERENCE[::-1], PROMOTE, "promoted")):
        verdict, at = simulate(current, canary, settings, RUNS, seed=2)
        hit = verdict == right
        medians.append(float(np.median(at[hit])) if hit.any() else float("inf"))
        rows.append((f"canary {canary:.0%} vs {current:.0%} bad", f"{hit.mean():.1%} {word}, median "
                                                                  f"{medians[-1]:.0f} rated canary answers"))
    out = {"canary_false_decision_rate": round(max(false_rates), 4), "canary_ratings_to_decision": max(medians)}
    rows += [(k, str(v)) for k, v in out.items()]
    print_table(f"canary decision rule: {RUNS} simulated rollouts each, share {settings.share:.0%}, "
                f"min {settings.min_rated} / max {settings.max_rated} rated, confidence {settings.confidence}", rows)
    return out


if __name__ == "__main__":
    run()
