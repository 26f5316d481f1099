"""Preference phases of a training job: trl's DPOTrainer (pairs from corrections) and KTOTrainer (unpaired
thumbs), run after (or instead of) the SFT loop of training/recipe.py, on the same LoRA adapter, in the same
process, reporting through the same `progress(step, total, loss)` and `should_stop()` as the SFT loop (a
trainer callback), so the job's stages, loss curve and cancel work unchanged.

No second copy of the base is ever loaded. The reference model is:
  - after an SFT phase: the adapter as SFT left it, as a frozen copy of its LoRA weights inside the same
    PeftModel (trl's "ref" adapter, megabytes). Each job trains a fresh adapter from the base on the whole
    dataset, so the previous published version is not an ancestor of this one; what the preference loss
    should measure is what the ratings add on top of what the examples taught. Anchoring to the bare base
    instead would count every SFT change as preference and let beta's pull toward the reference undo the
    taught facts;
  - with no SFT phase: the base with the adapter disabled (trl's `peft_config` path, our LoRA settings).
DPO runs with loss_type ["sigmoid", "sft"]: the SFT term on the chosen answer keeps corrections' facts
learned. KTO weighs the rarer kind of rating by the count ratio (preference.class_weights), and reads its
rows in the order `kto_order` gives: every pass freshly shuffled, liked and disliked in every batch.
A quantized base (NF4/int8) trains as QLoRA here too; trl casts LoRA weights of a quantized model to
bfloat16, and they are put back to float32 as the SFT loop keeps them.
"""

from __future__ import annotations

import logging
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field

from assistant.data.preference import PreferenceData, class_weights
from assistant.errors import TrainingStopped

log = logging.getLogger(__name__)

PREF_TARGET_EXAMPLES = 96     # preference_epochs=None: enough passes to see about this many rows...
MAX_PREF_AUTO_EPOCHS = 6      # ...but never more passes than this
MIN_KTO_BATCH = 2             # KTO estimates its KL term from other rows of the batch: 2 rows at least
REF_ADAPTER = "ref"           # the name trl gives the frozen reference copy of the adapter
CUT_COLUMN = "cut"            # a row whose rated answer its token limit cut (see _drop_cut_ends)


@dataclass
class PreferencePlan:
    """What a job's preference phases train on: the data, and the methods it runs (from preference.choose)."""
    data: PreferenceData
    methods: list[str]
    phases: list[dict] = field(default_factory=list)    # filled by train_preferences: one summary per phase

    def rows(self, method: str) -> list[dict]:
        return self.data.train_pairs() if method == "dpo" else self.data.train_kto()

    def to_dict(self) -> dict:
        """What a data-parallel rank needs to run the phases (JSON): the methods and the training rows."""
        return {"methods": list(self.methods), "pairs": self.data.train_pairs(), "kto": self.data.train_kto(),
                "counts": dict(self.data.counts)}

    @classmethod
    def from_dict(cls, d: dict) -> "PreferencePlan":
        return cls(PreferenceData(pairs=d["pairs"], kto=d["kto"], counts=d["counts"]), list(d["methods"]))

    def batch_size(self, method: str, settings, world: int = 1) -> int:
        """Rows per process and step: the batch (settings.batch_size) shared out between `world` processes."""
        per_process = math.ceil(settings.batch_size / world)
        return max(per_process, MIN_KTO_BATCH) if method == "kto" else per_process

    def epochs(self, method: str, settings) -> int:
        n = len(self.rows(method))
        return settings.preference_epochs or max(1, min(MAX_PREF_AUTO_EPOCHS, math.ceil(PREF_TARGET_EXAMPLES / max(n, 1))))

    def steps(self, settings, world: int = 1) -> int:
        """Optimizer steps of every preference phase (for the job's progress total) in `world` processes."""
        return sum(self.phase_steps(m, settings, world) for m in self.methods if m != "sft")

    def layout(self, method: str, settings) -> tuple[list[dict], int]:
        """(the rows trl reads, in order, and its epochs over them). trl's DPO trainer shuffles every epoch
        itself; its KTO trainer reads rows in the order given, so KTO's epochs are laid out by kto_order
        and trl makes one pass over them."""
        rows, epochs = self.rows(method), self.epochs(method, settings)
        return (kto_order(rows, epochs, settings.seed), 1) if method == "kto" else (rows, epochs)

    def phase_steps(self, method: str, settings, world: int = 1) -> int:
        rows, epochs = self.layout(method, settings)
        return math.ceil(len(rows) / (self.batch_size(method, settings, world) * world)) * epochs


def kto_order(rows: list[dict], epochs: int, seed: int) -> list[dict]:
    """The KTO rows for `epochs` passes, one after the other, each pass in a fresh seeded order that spreads
    the liked and the disliked rows evenly through it. trl's KTO trainer reads its rows in the order given
    (its KL term pairs each row with its neighbours in the batch), so shuffling is the caller's: in the
    order the ratings came, whole batches held one kind and every epoch ended on the same disliked rows."""
    rng = random.Random(seed)
    out = []
    for _ in range(epochs):
        placed = []
        for label in (True, False):
            group = [r for r in rows if bool(r["label"]) == label]
            rng.shuffle(group)
            # row i of a group sits in the i-th equal slice of the pass: kinds interleave at their ratio
            placed += [((i + rng.random()) / len(group), r) for i, r in enumerate(group)]
        out += [r for _, r in sorted(placed, key=lambda kr: kr[0])]
    return out


def _report(progress, should_stop, offset: int, total: int):
    """A trainer callback: each optimizer step's loss goes to `progress` (offset by the steps before this
    phase), and `should_stop()` is polled after every step."""
    from transformers import TrainerCallback

    class Report(TrainerCallback):
        losses: list[float] = []
        both_kinds = 0       # steps whose batch held liked and disliked answers (trl logs a reward for each)
        stopped = False

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and len(self.losses) < state.global_step:
                self.losses.append(float(logs["loss"]))
                self.both_kinds += "rewards/chosen" in logs and "rewards/rejected" in logs
                if progress is not None:
                    progress(offset + state.global_step, total, self.losses[-1])

        def on_step_end(self, args, state, control, **kw):
            if should_stop is not None and should_stop():
                self.stopped = True
                control.should_training_stop = True

    report = Report()
    report.losses = []
    return report


def _lora_config(settings):
    from peft import LoraConfig
    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(settings.target_modules), bias="none", task_type="CAUSAL_LM")


def _args(method: str, plan: PreferencePlan, settings, out: str, *, cuda: bool, checkpointing: bool, world: int):
    from trl import DPOConfig, KTOConfig
    steps = plan.phase_steps(method, settings, world)
    common = dict(output_dir=out, per_device_train_batch_size=plan.batch_size(method, settings, world),
                  num_train_epochs=plan.layout(method, settings)[1], learning_rate=settings.preference_learning_rate,
                  lr_scheduler_type="linear", warmup_steps=int(0.1 * steps), weight_decay=settings.weight_decay,
                  max_grad_norm=1.0, beta=settings.beta, max_length=settings.max_seq_len, bf16=False, fp16=False,
                  use_cpu=not cuda, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                  seed=settings.seed, data_seed=settings.seed, dataloader_num_workers=0,
                  gradient_checkpointing=checkpointing,
                  gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
                  ddp_find_unused_parameters=False)
    if method == "dpo":
        return DPOConfig(loss_type=["sigmoid", "sft"], **common)
    desirable, undesirable = class_weights(plan.data.counts)
    return KTOConfig(desirable_weight=desirable, undesirable_weight=undesirable, **common)


def _dataset(method: str, rows: list[dict]):
    from datasets import Dataset

    def reply(text):
        return [{"role": "assistant", "content": text}]

    if method == "dpo":
        return Dataset.from_list([{"prompt": r["prompt"], "chosen": reply(r["chosen"]), "rejected": reply(r["rejected"]),
                                   CUT_COLUMN: bool(r.get("rejected_cut"))} for r in rows])
    return Dataset.from_list([{"prompt": r["prompt"], "completion": reply(r["completion"]), "label": bool(r["label"]),
                               CUT_COLUMN: bool(r.get("cut"))} for r in rows])


def _drop_cut_ends(trainer, method: str, eos_id: int | None, batch_size: int) -> int:
    """An answer cut by its token limit never ended there: the end-of-turn trl's chat template adds after it
    is dropped from its tokens, so disliking a long cut answer does not teach "do not end" (which made answers
    longer) and liking it does not teach ending mid-sentence. -> how many rows were changed."""
    ds = trainer.train_dataset
    if CUT_COLUMN not in ds.column_names:
        return 0
    column = "rejected_ids" if method == "dpo" else "completion_ids"
    changed = sum(ds[CUT_COLUMN])

    def strip(ex):
        ids = ex[column]
        if ex[CUT_COLUMN] and eos_id is not None and eos_id in ids[1:]:
            ids = ids[:len(ids) - 1 - ids[::-1].index(eos_id)]
        return {column: ids}
    ds = ds.map(strip)
    if "KL_completion_ids" in ds.column_names:      # KTO's mismatched pairs, rebuilt from the new completions
        ds = ds.map(lambda b: {"KL_completion_ids": [b["completion_ids"][-1]] + b["completion_ids"][:-1]},
                    batched=True, batch_size=batch_size)
    trainer.train_dataset = ds.remove_columns([CUT_COLUMN])
    return changed


def train_preferences(base, peft_model, plan: PreferencePlan, settings, *, checkpointing: bool,
                      progress=None, should_stop=None, offset: int = 0, total: int | None = None, world: int = 1):
    """Run the plan's DPO / KTO phases on `peft_model` (the SFT phase's PeftModel) or, when it is None, on
    a fresh LoRA on `base` (peft_config): -> (the PeftModel, {"losses", "steps", "seconds"}). Raises
    TrainingStopped when `should_stop()` turns true. The reference copy trl adds is removed before return.
    With `world` > 1 this runs in each of that many data-parallel ranks (training/ddp_rank.py, the process group
    already up): trl's Trainer gives each rank its share of the rows and averages the gradients."""
    import torch
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from trl import DPOTrainer, KTOTrainer

    total = total if total is not None else offset + plan.steps(settings, world)
    cuda = base.device.startswith("cuda")
    losses: list[float] = []
    t0 = time.perf_counter()
    model = peft_model     # None: trl wraps the base (already prepared for k-bit training when quantized)
    for method in plan.methods:
        if method == "sft":
            continue
        rows, laid_out = plan.rows(method), plan.layout(method, settings)[0]
        with tempfile.TemporaryDirectory(prefix="assistant-pref-") as out:
            report = _report(progress, should_stop, offset, total)
            trainer_cls = DPOTrainer if method == "dpo" else KTOTrainer
            kwargs = {"peft_config": _lora_config(settings)} if model is None else {}
            if model is None:
                torch.manual_seed(settings.seed)
            started = time.perf_counter()
            trainer = trainer_cls(model=model if model is not None else base.model,
                                  args=_args(method, plan, settings, out, cuda=cuda, checkpointing=checkpointing,
                                             world=world),
                                  train_dataset=_dataset(method, laid_out), processing_class=base.tokenizer,
                                  callbacks=[report], **kwargs)
            cut = _drop_cut_ends(trainer, method, base.tokenizer.eos_token_id, plan.batch_size(method, settings, world))
            # data-parallel: only the LoRA weights are synchronised, not the frozen base nor trl's reference copy
            trainer.model._ddp_params_and_buffers_to_ignore = (
                [n for n, p in trainer.model.named_parameters() if not p.requires_grad]
                + [n for n, _ in trainer.model.named_buffers()])
            for p in trainer.model.parameters():    # LoRA in float32, as the SFT loop keeps it
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.float()
            trainer.train()
            model = trainer.model
            if REF_ADAPTER in getattr(model, "peft_config", {}):
                model.delete_adapter(REF_ADAPTER)
            model.set_adapter("default")
            steps = trainer.state.global_step
            offset += steps
            losses += report.losses
            cut //= len(laid_out) // max(len(rows), 1)     # of the rated rows, not of their repeats
            plan.phases.append({"method": method, "rows": len(rows), "steps": steps, "cut_answers": cut,
                                "epochs": plan.epochs(method, settings), "processes": world,
                                **({"steps_with_both_kinds": report.both_kinds} if method == "kto" else {}),
                                "loss_first": report.losses[0] if report.losses else None,
                                "loss_last": report.losses[-1] if report.losses else None,
                                "seconds": round(time.perf_counter() - started, 2),
                                "reference": "the base (adapter disabled)" if "peft_config" in kwargs
                                             else "the adapter as the phase before left it (a frozen copy)",
                                **_phase_settings(trainer.args, method, world)})
            del trainer
            if report.stopped:
                raise TrainingStopped(f"stopped at step {offset}/{total}")
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model, {"losses": losses, "steps": offset, "seconds": time.perf_counter() - t0}


def _phase_settings(args, method: str, world: int) -> dict:
    out = {"beta": args.beta, "learning_rate": args.learning_rate,
           "batch_size": args.per_device_train_batch_size * world}
    if method == "dpo":
        out["loss_type"] = list(args.loss_type)
    else:
        out.update(desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight)
    return out
