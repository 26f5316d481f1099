"""What the app keeps, and the dataset made from it.

Entry points: `store.Store` (responses, feedback, seeds, review, snapshots, jobs and their stages, on
SQLite or PostgreSQL through `db`, schema in `migrations`), `registry.Registry` (domains and adapter
versions on disk), `curation.curate` / `curation.run` (candidates -> an immutable, hashed snapshot: quality,
pii, dedup, embeddings), `preference` (ratings -> DPO pairs and KTO rows), `stages` (a job's stages as its
record shows them), `rollouts` (canary rollouts and their arms' ratings), `stored_responses` (the Responses API's
stored answers), `seeds`, `conversations`,
`answer_cache`.

May import: the foundation, engine (lm, threads), cluster (coordination).
"""
