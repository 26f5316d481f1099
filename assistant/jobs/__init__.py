"""Training jobs: one click -> curate, train, evaluate, publish, activate, in a child process.

Entry points: `run.start_job` (checks, curation, the queued record), `run.run_job` (what the child runs:
`python -m assistant.jobs.run`), `run.retry_job`; `process` (the child started, watched, cancelled and
reaped), `workers` (`assistant worker`: claim queued jobs from a shared database), `attempts` (a job's
retries and what each kept), `limits` (what the serving engine accepts, checked before work starts),
`release` (how a passed version goes out: live, or as a canary).

May import: the foundation, engine, cluster, data, gate, training.
"""
