"""One rank of a data-parallel training run: `python -m assistant.training.ddp_rank WORKDIR` (training/ddp.py starts N of them).

    accelerate's Accelerator (the process group from the environment training/ddp.py set: gloo on CPU, NCCL on CUDA,
    this rank's GPU) -> the base on this rank's device, loaded as the job loaded it -> the same seeded LoRA
    as one process -> DDP over the LoRA parameters only (the frozen base is neither broadcast nor
    synchronised) -> each step: this rank's share batch[rank::N] of the global batch, its loss scaled by
    (its labelled tokens x N / all ranks' labelled tokens), so that DDP's average of the gradients is the
    gradient of the global batch's mean loss, as in one process -> the same clipping, AdamW and schedule ->
    the preference phases (DPO / KTO) when the plan has them, through trl's trainers in the same process
    group (preference_train.train_preferences: each rank its share of the rows, gradients averaged) ->
    rank 0 reports every step on the pipe and saves the adapter.

A rank whose share of a batch is empty (a last batch smaller than N) runs one of the batch's rows with
weight 0, so that every rank takes part in every gradient all-reduce.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from assistant.engine.lm import causal_lm_loss, collate
from assistant.training.ddp import ADAPTER_DIR, FD_VAR, PARENT_VAR, PLAN_FILE
from assistant.training.recipe import (
    GRAD_CLIP_NORM,
    QUANTIZED,
    TrainSettings,
    make_optimizer,
    prepare_quantized,
    save_adapter,
    wrap_lora,
)

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1             # prctl(2): the signal this process gets when its parent ends


def _die_with_parent() -> None:
    """SIGKILL this rank when the process that started it ends (Linux), so no rank outlives its job."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    parent = int(os.environ.get(PARENT_VAR) or 0)
    if parent and os.getppid() != parent:   # it ended before prctl
        os._exit(1)


def _batch_loss(peft_model, checkpointing: bool):
    """The module DDP wraps: a batch -> (mean loss over its labelled tokens, their count). DDP ignores
    every frozen parameter and buffer: only the LoRA weights are synchronised."""
    import torch

    class BatchLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.peft_model = peft_model

        def forward(self, input_ids, labels, mask):
            return causal_lm_loss(self.peft_model.get_base_model(), input_ids, labels, mask,
                                  checkpoint_chunks=checkpointing)

    module = BatchLoss()
    module._ddp_params_and_buffers_to_ignore = (
        [n for n, p in module.named_parameters() if not p.requires_grad] + [n for n, _ in module.named_buffers()])
    return module


def train(plan: dict, report) -> None:
    """This rank's part of the run; rank 0 calls `report(message)` after every step and at the end."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from assistant.engine.model import load_base, trainable_4bit
    from assistant.settings import Settings

    accelerator = Accelerator(cpu=plan["cpu"], mixed_precision="no", device_placement=False)
    rank, world = accelerator.process_index, accelerator.num_processes
    device = "cpu" if plan["cpu"] else str(accelerator.device)      # cuda:rank (of the GPUs training/ddp.py made visible)
    settings = TrainSettings.from_record(plan["settings"])
    base = load_base(Settings(base_model=plan["base_model"], dtype=plan["dtype"], quantization=plan["quantization"],
                              device=device), verbose=False)
    if base.quantization == "nf4" and not base.device.startswith("cuda"):
        trainable_4bit(base.model)
    schedule = plan["schedule"]
    total = plan.get("total_steps") or len(schedule)
    log.info("rank %d of %d on %s: %d steps", rank, world, device, total)

    def progress(step, _total, loss):
        if rank == 0:
            report({"event": "step", "step": step, "total": total, "loss": loss})

    t0 = time.perf_counter()
    peft_model, run = None, {"losses": [], "tokens": 0, "label_tokens": 0, "own_tokens": 0}
    if schedule:
        peft_model, run = _sft(accelerator, base, plan, settings, progress)
    elif base.quantization in QUANTIZED:
        prepare_quantized(base.model, plan["checkpointing"])
    phases = []
    if plan.get("preference"):
        from assistant.training.preference import PreferencePlan, train_preferences
        pref_plan = PreferencePlan.from_dict(plan["preference"])
        peft_model, pref = train_preferences(base, peft_model, pref_plan, settings, checkpointing=plan["checkpointing"],
                                             progress=progress, offset=len(schedule), total=total, world=world)
        run["losses"] += pref["losses"]
        phases = pref_plan.phases
    seconds = time.perf_counter() - t0

    if rank == 0:
        save_adapter(peft_model, Path(plan["work"]) / ADAPTER_DIR)
    ranks = gather_object([{"rank": rank, "pid": os.getpid(), "device": device, "tokens": run["own_tokens"],
                            "digest": _digest(peft_model)}])
    if rank == 0:
        report({"event": "done", "losses": run["losses"], "tokens": run["tokens"], "label_tokens": run["label_tokens"],
                "seconds": seconds, "world_size": world, "ranks": ranks, "phases": phases,
                "steps": len(run["losses"])})
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


def _digest(peft_model) -> str:
    """A hash of this rank's LoRA weights: every rank ends with the same ones when the gradients were shared."""
    import hashlib
    h = hashlib.sha256()
    for name, tensor in sorted((n, t) for n, t in peft_model.state_dict().items() if "lora_" in n):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _sft(accelerator, base, plan: dict, settings: TrainSettings, progress):
    """The SFT loop, data-parallel: (the PeftModel, {losses, tokens, label_tokens, own_tokens})."""
    import torch
    rank, world = accelerator.process_index, accelerator.num_processes
    device = base.device
    peft_model, _, params = wrap_lora(base.model, settings, quantized=base.quantization in QUANTIZED,
                                      checkpointing=plan["checkpointing"])
    torch.manual_seed(settings.seed + rank)            # LoRA dropout: other masks on other ranks
    model = accelerator.prepare_model(_batch_loss(peft_model, plan["checkpointing"]), device_placement=False)
    examples, schedule = plan["examples"], plan["schedule"]
    optimizer, scheduler = make_optimizer(params, settings, len(schedule))

    losses, tokens, label_tokens, own_tokens = [], 0, 0, 0
    for step, batch in enumerate(schedule, start=1):
        share = batch[rank::world]
        input_ids, labels, mask = (t.to(device) for t in collate([examples[i] for i in share or batch[:1]],
                                                                 plan["pad_id"]))
        loss, n = model(input_ids, labels, mask)
        n, real = (n, int(mask.sum())) if share else (0, 0)
        counts = accelerator.reduce(torch.tensor([float(loss.detach()) * n, n, real], dtype=torch.float64,
                                                 device=device), reduction="sum")
        loss_sum, n_all, real_all = counts.tolist()
        accelerator.backward(loss * (n * world / n_all))
        accelerator.clip_grad_norm_(params, GRAD_CLIP_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss_sum / n_all)
        tokens, label_tokens, own_tokens = tokens + int(real_all), label_tokens + int(n_all), own_tokens + real
        progress(step, len(schedule), losses[-1])
    accelerator.free_memory(model)       # the SFT loop's DDP wrapper: a preference phase wraps the model anew
    return peft_model, {"losses": losses, "tokens": tokens, "label_tokens": label_tokens, "own_tokens": own_tokens}


def main(argv: list[str] | None = None) -> int:
    _die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = Path((argv or sys.argv[1:])[0])
    plan = {**json.loads((work / PLAN_FILE).read_text()), "work": str(work)}
    fd = int(os.environ[FD_VAR])

    def report(message: dict) -> None:
        data = (json.dumps(message) + "\n").encode()
        while data:
            data = data[os.write(fd, data):]

    train(plan, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
