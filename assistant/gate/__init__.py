"""The promotion gate: a new adapter version measured against the live one, and a verdict a person can read.

Entry points: `evaluation.evaluate_adapter` / `evaluate_version` (before/after answers and losses on corrections,
held-out rows and the probe set), `verdict.verdict` and `GateSettings` (the checks, their bounds and explanations), `probes`
(the general-knowledge probe set), `retention` (what a new version kept and what leaked), `preference`
(the held-out preference check).

May import: the foundation, engine, data.
"""
