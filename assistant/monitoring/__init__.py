"""What each domain and adapter version serves, how people rate it, and when to retrain.

Entry points: `report` (`MonitorSettings`, per-domain and per-version health, the retrain advice),
`drift` (how far new questions moved from the trained ones), `canary` (`Canary`: which version answers a
conversation while a rollout runs, and the verdict of its users' ratings; `CanarySettings`).

May import: the foundation, data.
"""
