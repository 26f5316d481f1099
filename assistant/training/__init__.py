"""The training recipe: curated chat rows -> a LoRA adapter folder.

Entry points: `recipe.train_adapter` and `TrainSettings` (LoRA/QLoRA, packing, replay, the one checker of
training settings), `memory.check_job_memory` (what a job needs, before it starts), `preference`
(DPO and KTO phases with trl), `ddp` + `ddp_rank` (data-parallel jobs, --train-gpus), `train_rows`.

May import: the foundation, engine, data.
"""
