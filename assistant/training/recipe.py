"""The training recipe: curated chat rows -> a LoRA adapter folder. One function, `train_adapter`, used by
the UI, the API (through jobs), the CLI and the tests. It reads top to bottom:

    load the base -> train rows (the confirmed turns of one conversation in one row, + re-worded copies of
    each question on small datasets, + a few general prompts answered by the base itself, against
    forgetting) -> chat template, labels on taught assistant tokens only -> batches of about batch_size
    taught answers, each packed into sequences without padding -> wrap in LoRA -> a short AdamW loop -> save a PEFT folder.

On CPU the base is float32 and LoRA is plain, unless NF4/int8 is asked for. On CUDA the base is NF4 by
default. A quantized base trains as QLoRA (through `load_base`): peft's k-bit preparation and gradient
checkpointing, LoRA weights in float32. The loss never builds the full [batch, seq, vocab]
logits: the decoder's hidden states are gathered at the positions that carry a label (assistant
tokens), and the vocabulary projection + cross-entropy run in chunks of those positions (each chunk
recomputed in backward when checkpointing is on). That saves memory at the peak on GPU and time on CPU,
where prompt and padding positions are most of every batch. With `processes` > 1 (--train-gpus) the
batches prepared here are trained data-parallel by that many processes (training/ddp.py), with the same result,
and so are the preference phases that follow (trl's trainers in the same process group).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from assistant.data.conversations import merge_turns, taught_turns
from assistant.engine.lm import IGNORE_INDEX, causal_lm_loss, encode_chat, pack
from assistant.errors import InvalidSetting, TrainingStopped
from assistant.settings import MAX_LORA_RANK
from assistant.training.train_rows import QUESTION_VARIANTS, REPLAY_MAX_NEW_TOKENS, REPLAY_PROMPTS, augment_rows, replay_rows

# Limits and recipe constants have names.
MIN_EXAMPLES = 8               # curated examples needed before a domain can be trained (422 below this)
TARGET_EXAMPLES_SEEN = 240     # epochs=None: enough passes that the recipe sees about this many examples...
MAX_AUTO_EPOCHS = 12           # ...but never more passes than this (a few dozen corrections -> ~12 epochs)
WARMUP_FRACTION = 0.1          # of the optimizer steps, linear warm-up then linear decay...
FINAL_LR_FRACTION = 0.1        # ...to this share of the peak learning rate at the last step
GRAD_CLIP_NORM = 1.0           # gradients are clipped to this global L2 norm before each step
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Activation memory kept for backward, bytes per token x layer x (hidden + intermediate size), measured on
# SmolLM2-135M in float32 with LoRA on every linear layer (2,000 tokens: 6.4 GB of peak memory without
# checkpointing, 3.3 GB with it). On CPU, `auto` checkpoints a job whose largest step would keep more than
# the budget (about 1,000 tokens on that model: a batch of long conversations), at ~30% more time per step.
ACTIVATION_BYTES = 24
CPU_ACTIVATION_BUDGET_GB = 1.5
QUANTIZED = ("nf4", "int8")   # bases trained as QLoRA (k-bit preparation, gradient checkpointing by default)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


# A job whose version the gate blocks for forgetting trains again with a safer recipe (`safer_recipe`), at
# most `retries` times: each attempt scales the learning rate and the passes by these, and replays every
# general prompt.
SAFER_LR_FACTOR = 0.5
SAFER_EPOCHS_FACTOR = 0.75   # fewer passes, not too few: at half as many a safer attempt stopped learning the facts
SAFER_MAX_SCALE = 2.0     # and LoRA's scale (alpha / rank) at most the default recipe's (32 / 16)
MAX_RETRIES = 5
MAX_EPOCHS = 100          # more passes than this over a dataset is a typo, not a plan
MAX_BATCH_SIZE = 256
MIN_SEQ_LEN = 16          # shorter rows hold no more than a chat template's markers
MAX_SEQ_LEN = 8192


RELEASES = ("live", "canary")        # how a version the gate passes goes out


@dataclass(frozen=True)
class TrainSettings:
    rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / rank)"})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    learning_rate: float = field(default=1.5e-3, metadata={"help": "peak AdamW learning rate"})
    epochs: int | None = field(default=None, metadata={
        "help": f"passes over the train split; None scales to the dataset (~{TARGET_EXAMPLES_SEEN} examples "
                f"seen, at most {MAX_AUTO_EPOCHS} passes)"})
    batch_size: int = field(default=8, metadata={
        "help": "taught answers per optimizer step (a conversation's confirmed turns count one each)"})
    max_seq_len: int = field(default=512, metadata={"help": "tokens per row; longer rows are cut at the end"})
    seed: int = field(default=0, metadata={"help": "seeds LoRA init, batch order and dropout"})
    augment: int = field(default=3, metadata={
        "help": "extra copies of each train row with a re-worded question, on small datasets only "
                "(they replace repeated passes); helps answering paraphrases. 0 = off"})
    replay: int = field(default=32, metadata={
        "help": f"general prompts (of {len(REPLAY_PROMPTS)}) answered by the base and mixed into training, "
                "at most one per train example (re-worded copies count), so the adapter keeps general answers; "
                "0 = off"})
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGETS, metadata={"help": "modules wrapped by LoRA"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    gradient_checkpointing: str = field(default="auto", metadata={
        "help": "auto | on | off (auto: on with CUDA or a quantized base; on CPU, only for steps that would keep "
                f"more than {CPU_ACTIVATION_BUDGET_GB:g} GB of activations, such as batches of long conversations)"})
    method: str = field(default="auto", metadata={
        "help": "auto | methods joined by '+' from sft, dpo, kto (e.g. sft+kto). SFT learns seeds, thumbs-up "
                "answers and corrections; DPO learns each correction over the answer it corrected, and a liked "
                "over a disliked answer to one question (needs 4+ such pairs); KTO learns from thumbs up and down "
                "(needs 4+ of each kind). auto: SFT, plus one preference method once there are 10+ liked and 10+ "
                "disliked answers, so the gate can judge it: DPO when corrections make 4+ pairs, else KTO (the "
                "job record says which ran)"})
    beta: float = field(default=0.1, metadata={
        "help": "DPO/KTO beta: how far the preference phase may move from its reference (higher: less)"})
    preference_learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate of DPO/KTO"})
    preference_epochs: int | None = field(default=None, metadata={
        "help": "passes over the DPO pairs / KTO rows; None scales to the data (~96 rows seen, at most 6 passes)"})
    retries: int = field(default=2, metadata={
        "help": "when the gate finds the new version forgot general answers (or leaks taught words into them), "
                f"train again up to this many times, each with a safer recipe (learning rate x{SAFER_LR_FACTOR}, "
                f"passes x{SAFER_EPOCHS_FACTOR}, every replay prompt, LoRA scale at most {SAFER_MAX_SCALE:g}); 0 = off"})
    release: str = field(default="live", metadata={
        "help": "live | canary: a version the gate passes goes live for everyone (live), or out as a canary to "
                "--canary.share of the domain's conversations beside the live version, promoted or rolled back "
                "by its users' ratings (canary)"})

    def __post_init__(self):
        if isinstance(self.target_modules, (list, str)):
            mods = (self.target_modules,) if isinstance(self.target_modules, str) else self.target_modules
            object.__setattr__(self, "target_modules", tuple(mods))
        checks = [("rank", 1 <= self.rank <= MAX_LORA_RANK, f"must be between 1 and {MAX_LORA_RANK}"),
                  ("alpha", self.alpha > 0, "must be positive"),
                  ("dropout", 0.0 <= self.dropout < 1.0, "must be in [0, 1)"),
                  ("learning_rate", 0.0 < self.learning_rate < 1.0, "must be in (0, 1)"),
                  ("epochs", self.epochs is None or 1 <= self.epochs <= MAX_EPOCHS,
                   f"must be between 1 and {MAX_EPOCHS} (or null for auto)"),
                  ("augment", 0 <= self.augment <= len(QUESTION_VARIANTS), f"must be in 0..{len(QUESTION_VARIANTS)}"),
                  ("replay", 0 <= self.replay <= len(REPLAY_PROMPTS), f"must be in 0..{len(REPLAY_PROMPTS)}"),
                  ("batch_size", 1 <= self.batch_size <= MAX_BATCH_SIZE, f"must be between 1 and {MAX_BATCH_SIZE}"),
                  ("max_seq_len", MIN_SEQ_LEN <= self.max_seq_len <= MAX_SEQ_LEN,
                   f"must be between {MIN_SEQ_LEN} and {MAX_SEQ_LEN}"),
                  ("target_modules", bool(self.target_modules), "must name at least one module"),
                  ("gradient_checkpointing", self.gradient_checkpointing in ("auto", "on", "off"),
                   "must be auto, on or off"),
                  ("beta", 0.0 < self.beta <= 10.0, "must be in (0, 10]"),
                  ("preference_learning_rate", 0.0 < self.preference_learning_rate < 1.0, "must be in (0, 1)"),
                  ("preference_epochs", self.preference_epochs is None or 1 <= self.preference_epochs <= MAX_EPOCHS,
                   f"must be between 1 and {MAX_EPOCHS} (or null for auto)"),
                  ("retries", 0 <= self.retries <= MAX_RETRIES, f"must be between 0 and {MAX_RETRIES}"),
                  ("release", self.release in RELEASES, f"must be {' or '.join(RELEASES)}")]
        from assistant.data.preference import parse
        try:
            parse(self.method)
        except ValueError as e:
            checks.append(("method", False, str(e).removeprefix("method ")))
        for name, ok, message in checks:
            if not ok:
                raise InvalidSetting(f"training setting {name} {message}", param=name)

    @classmethod
    def from_dict(cls, d: dict | None, defaults: dict | None = None) -> "TrainSettings":
        """The one check of training settings, where they enter (the UI's form, the API's body, the CLI's
        flags and config file): `defaults` (the server's `--train.*`), then `d`, each value checked against
        its field's type and range; an `InvalidSetting` names the field. Unknown keys are refused with the
        list of known ones. From here on they travel as a TrainSettings."""
        from assistant.settings import checked_values
        if d is not None and not isinstance(d, dict):
            raise InvalidSetting("training settings must be an object of name: value pairs", param="settings")
        return cls(**checked_values(cls, {**(defaults or {}), **(d or {})}, "training"))

    @classmethod
    def of(cls, value: "TrainSettings | dict | None", defaults: dict | None = None) -> "TrainSettings":
        """Settings checked already (a TrainSettings) as they are; anything else through `from_dict`."""
        return value if isinstance(value, cls) else cls.from_dict(value, defaults)

    @classmethod
    def from_record(cls, d: dict) -> "TrainSettings":
        """Back from `to_dict` (a job's record): settings that were checked when the job was made."""
        return cls(**{**d, "target_modules": tuple(d["target_modules"])})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


def safer_recipe(settings: TrainSettings, epochs_run: int) -> TrainSettings:
    """The recipe of the next attempt after the gate found forgetting: a smaller learning rate, fewer passes
    (of the `epochs_run` the last attempt ran), every replay prompt, and LoRA's scale no larger than the
    default recipe's (a lower rank with the default alpha scales every update up). The preference phases,
    if any, are made gentler the same way."""
    from dataclasses import replace
    return replace(settings, learning_rate=settings.learning_rate * SAFER_LR_FACTOR,
                   alpha=min(settings.alpha, max(1, int(SAFER_MAX_SCALE * settings.rank))),
                   epochs=max(1, math.ceil(epochs_run * SAFER_EPOCHS_FACTOR)), replay=len(REPLAY_PROMPTS),
                   preference_learning_rate=settings.preference_learning_rate * SAFER_LR_FACTOR)


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    epochs: int
    losses: list[float]           # one per optimizer step
    tokens: int                   # real (non-padding) tokens processed in training
    label_tokens: int             # of those, the assistant tokens that carried loss
    seconds: float                # the training loop alone
    n_train: int                  # train-split rows
    n_examples: int               # sequences trained on: rows plus re-worded copies, less dropped ones
    n_dropped: int                # sequences with nothing to learn after truncation
    settings: dict
    fingerprint: dict
    world_size: int = 1           # processes that trained it together (train_gpus)
    padding_fraction: float = 0.0  # of the positions the SFT loop computed, those that held no token
    peak_memory_gb: float = 0.0   # the training process's peak: resident memory on CPU, allocated on CUDA
    methods: list[str] = field(default_factory=lambda: ["sft"])   # what ran, in order
    phases: list[dict] = field(default_factory=list)              # one summary per DPO/KTO phase
    model: object = field(default=None, repr=False)      # the trained PeftModel (not serialised)
    tokenizer: object = field(default=None, repr=False)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict:
        return {"steps": self.steps, "epochs": self.epochs, "train_loss_first": self.losses[0] if self.losses else None,
                "train_loss_last": self.losses[-1] if self.losses else None, "tokens": self.tokens,
                "label_tokens": self.label_tokens, "train_seconds": round(self.seconds, 2),
                "tokens_per_second": round(self.tokens_per_second, 1), "padding_fraction": self.padding_fraction,
                "peak_memory_gb": self.peak_memory_gb, "n_train": self.n_train,
                "n_examples": self.n_examples, "n_dropped": self.n_dropped,
                "methods": self.methods, **({"phases": self.phases} if self.phases else {}),
                **({"world_size": self.world_size} if self.world_size > 1 else {})}


# ---------------------------------------------------------------------------------------------
# Data: chat rows -> token ids and labels
# ---------------------------------------------------------------------------------------------

def answer_batches(answers: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Row indices in random order, grouped so that each batch holds about `batch_size` taught answers: rows
    of one answer `batch_size` at a time, a conversation of many confirmed turns in a batch of its own (so
    its facts get as many optimizer steps as the same facts taught one row each). Packing (lm.pack) makes
    mixed lengths cost no padding."""
    order = list(range(len(answers)))
    rng.shuffle(order)
    batches, batch, held = [], [], 0
    for i in order:
        batch.append(i)
        held += answers[i]
        if held >= batch_size:
            batches.append(batch)
            batch, held = [], 0
    return batches + ([batch] if batch else [])


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------

def training_base_settings(settings):
    """The settings a job loads its base with: NF4 on CUDA (QLoRA) and float32 on CPU (training in bf16
    weights loses the small LoRA updates). An explicit --quantization nf4/int8 trains on the quantized
    weights on CPU too (QLoRA, float32 compute). A job trains on --train-device (default: --device)."""
    from assistant.engine.model import resolve_device
    settings = settings.with_(device=settings.train_device)
    if resolve_device(settings.device).startswith("cuda"):
        return settings.with_(quantization="nf4" if settings.quantization == "auto" else settings.quantization)
    return settings.with_(dtype="float32",
                          quantization="none" if settings.quantization == "auto" else settings.quantization)


def _load(base_settings_or_path):
    """A `Base` for training: an already loaded Base is used as is; a Settings or a model folder is loaded
    with `training_base_settings`."""
    from assistant.engine.model import Base, load_base
    from assistant.settings import Settings
    if isinstance(base_settings_or_path, Base):
        return base_settings_or_path
    if isinstance(base_settings_or_path, Settings):
        settings = base_settings_or_path
    else:
        settings = Settings(base_model=str(base_settings_or_path))
    return load_base(training_base_settings(settings), verbose=False)


def prepare_quantized(model, checkpointing: bool):
    """What peft's `prepare_model_for_kbit_training` does for QLoRA, without its float32 copy of every weight
    that is not quantized: an 8B model's embeddings and LM head would take 4 GB instead of 2 in bfloat16,
    which is most of what NF4 saves. The base is frozen, its input embeddings carry gradients (so the
    checkpointed layers see inputs that need them), and gradient checkpointing is on when asked."""
    for p in model.parameters():
        p.requires_grad_(False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model


def activation_gb(config, tokens: int) -> float:
    """What a training step of `tokens` tokens keeps for backward without checkpointing (GB, float32)."""
    width = getattr(config, "hidden_size", 0) + getattr(config, "intermediate_size", 0)
    return tokens * getattr(config, "num_hidden_layers", 0) * width * ACTIVATION_BYTES / 2 ** 30


def auto_epochs(n_train: int) -> int:
    return max(1, min(MAX_AUTO_EPOCHS, math.ceil(TARGET_EXAMPLES_SEEN / max(n_train, 1))))


def wrap_lora(model, settings: TrainSettings, *, quantized: bool, checkpointing: bool):
    """The base wrapped in LoRA, seeded (the A matrices are random), in train mode:
    (peft_model, the causal LM inside it, the trainable parameters)."""
    import torch
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(settings.seed)
    if quantized:   # QLoRA: LoRA in float32 (PEFT's default) on frozen 4-bit (or 8-bit) weights
        model = prepare_quantized(model, checkpointing)
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(settings.target_modules), bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    # HF applies gradient checkpointing only in train mode: train() is what makes it really apply.
    peft_model.train()
    return peft_model, peft_model.get_base_model(), [p for p in peft_model.parameters() if p.requires_grad]


def make_optimizer(params, settings: TrainSettings, total_steps: int):
    """AdamW with a linear warm-up, then a linear decay to FINAL_LR_FRACTION of the peak: (optimizer, scheduler)."""
    import torch
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    warmup = max(1, int(WARMUP_FRACTION * total_steps))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 1.0 - (1.0 - FINAL_LR_FRACTION) * (step - warmup) / max(1, total_steps - warmup)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)


def save_adapter(peft_model, out_dir: Path) -> None:
    """A standard PEFT folder (safetensors only) in `out_dir`."""
    peft_model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    for extra in out_dir.iterdir():
        if extra.name not in ADAPTER_FILES and extra.is_file():
            extra.unlink()  # the generated README.md model card: card.json is ours


def train_adapter(base_settings_or_path, rows: list[dict], out_dir: Path, settings: TrainSettings | None = None,
                  progress: Callable[[int, int, float], None] | None = None,
                  should_stop: Callable[[], bool] | None = None, *, processes: int = 1,
                  note: Callable[[str], None] | None = None, preference=None, cache_dir=None) -> TrainResult:
    """Train a LoRA adapter on the `train` rows and save it as a PEFT folder in `out_dir`.

    `rows`: [{"messages": [{"role", "content"}, ...], "split": "train" | "eval"}]; rows without a split
    count as train. `progress(step, total_steps, loss)` is called after every optimizer step;
    `should_stop()` is polled before each step and stops the run with `TrainingStopped`. `processes` > 1
    trains data-parallel in that many processes (training/ddp.py): the batches prepared here, then the preference phases.
    `note(text)` hears each sub-step before the first optimizer step (replay answers, tokenizing, LoRA setup).
    `preference`: a preference_train.PreferencePlan; its DPO/KTO phases run after the SFT phase (or alone,
    when its methods leave SFT out) on the same adapter, counted in the same progress. `cache_dir`: where
    the base's self-replay answers are kept for later jobs (data/answer_cache.py; None: not kept)."""
    from assistant.engine.model import trainable_4bit
    from assistant.errors import DatasetTooSmall

    settings = settings or TrainSettings()
    out_dir = Path(out_dir)

    # 1. Load the base.
    base = _load(base_settings_or_path)
    model, tok = base.model, base.tokenizer
    if base.quantization == "nf4" and not base.device.startswith("cuda"):
        trainable_4bit(model)   # before the replay answers run it in eval mode
    on_cuda = base.device.startswith("cuda")
    quantized = base.quantization in QUANTIZED

    # 2. Data: chat template, labels on assistant tokens only.
    rng = random.Random(settings.seed)
    train_rows = [r for r in rows if r.get("split", "train") == "train"]
    n_rows = len(train_rows)
    # The confirmed turns of one conversation are taught in one sequence (conversations.merge_turns).
    train_rows = merge_turns(train_rows)
    # Re-worded copies replace repeated passes on small datasets; large ones get none (no extra cost).
    copies = min(settings.augment, max(0, TARGET_EXAMPLES_SEEN // max(n_rows, 1) - 1))
    train_rows = augment_rows(train_rows, copies, rng)
    # Self-replay, with the system prompt the domain's rows use.
    system = next((r["messages"][0]["content"] for r in train_rows if r["messages"][0]["role"] == "system"), None)
    note = note or (lambda _text: None)
    n_replay = min(settings.replay, sum(taught_turns(r) for r in train_rows))
    cache = None
    if n_replay:
        from assistant.data.answer_cache import AnswerCache, identity
        cache = AnswerCache(cache_dir, identity(base, system, REPLAY_MAX_NEW_TOKENS, what="replay"))
        fresh = n_replay - len(cache.get(REPLAY_PROMPTS))
        note(f"self-replay: the base answers {n_replay} general prompts"
             + (f" ({max(0, fresh)} new, the rest kept from earlier jobs)" if cache_dir is not None else ""))
    train_rows += replay_rows(model, tok, system, n_replay, rng, cache)
    note(f"tokenizing {len(train_rows)} rows")
    encoded = [encode_chat(tok, r["messages"], settings.max_seq_len) for r in train_rows]
    kept = [i for i, e in enumerate(encoded) if any(label != IGNORE_INDEX for label in e[1][1:])]
    examples = [encoded[i] for i in kept]
    answers = [max(1, taught_turns(train_rows[i])) for i in kept]    # taught replies: what batches and passes count
    if len(examples) < 1 and (preference is None or "sft" in preference.methods):
        raise DatasetTooSmall("no training row has an assistant answer to learn from: add examples or corrections")
    epochs = settings.epochs or auto_epochs(sum(answers))
    schedule = [b for _ in range(epochs) for b in answer_batches(answers, settings.batch_size, rng)]
    step_tokens = max((sum(len(examples[i][0]) for i in b) for b in schedule), default=0)
    checkpointing = settings.gradient_checkpointing == "on" or (settings.gradient_checkpointing == "auto" and (
        on_cuda or quantized or activation_gb(model.config, step_tokens) > CPU_ACTIVATION_BUDGET_GB))
    methods = preference.methods if preference is not None else ["sft"]
    if "sft" not in methods:
        schedule = []
    pref_steps = preference.steps(settings, processes) if preference is not None else 0
    total_steps = len(schedule) + pref_steps
    sft_progress = progress if progress is None or not pref_steps else (
        lambda step, _total, loss: progress(step, total_steps, loss))
    note(f"LoRA setup and the first of {total_steps} steps")

    # 3-5. LoRA, the loop (SFT, then DPO / KTO), the saved folder: here, or in `processes` processes that
    # share each batch.
    if processes > 1:
        from peft import PeftModel

        from assistant.training.ddp import train_ranks
        run = train_ranks(base, examples, schedule, settings.to_dict(), out_dir, processes,
                          checkpointing=checkpointing, progress=progress, should_stop=should_stop,
                          preference=preference.to_dict() if pref_steps else None, total_steps=total_steps)
        if "stopped_at" in run:
            raise TrainingStopped(f"stopped at step {run['stopped_at']}/{total_steps}")
        peft_model = PeftModel.from_pretrained(model, str(out_dir))     # what the ranks trained, on this base
        if pref_steps:
            preference.phases[:] = run["phases"]
            total_steps = run["steps"]
    else:
        if not schedule:
            peft_model, run = None, {"losses": [], "tokens": 0, "label_tokens": 0, "seconds": 0.0}
            if quantized:
                prepare_quantized(model, checkpointing)
        else:
            peft_model, run = _train_here(base, examples, schedule, settings, out_dir, quantized=quantized,
                                          checkpointing=checkpointing, progress=sft_progress, should_stop=should_stop)
        if pref_steps:
            from assistant.training.preference import train_preferences
            peft_model, pref = train_preferences(base, peft_model, preference, settings, checkpointing=checkpointing,
                                                 progress=progress, should_stop=should_stop, offset=len(schedule),
                                                 total=total_steps)
            save_adapter(peft_model, out_dir)
            run = {**run, "losses": run["losses"] + pref["losses"], "seconds": run["seconds"] + pref["seconds"]}
            total_steps = pref["steps"]
    return TrainResult(adapter_dir=out_dir, steps=total_steps, epochs=epochs, losses=run["losses"],
                       tokens=run["tokens"], label_tokens=run["label_tokens"], seconds=run["seconds"],
                       n_train=n_rows, n_examples=len(examples), n_dropped=len(encoded) - len(examples),
                       settings=settings.to_dict(), fingerprint=base.fingerprint,
                       world_size=run.get("world_size", 1), padding_fraction=run.get("padding_fraction", 0.0),
                       peak_memory_gb=peak_memory_gb(base.device),
                       model=peft_model, tokenizer=tok, methods=list(methods),
                       phases=list(preference.phases) if preference is not None else [])


def peak_memory_gb(device: str) -> float:
    """This process's peak memory so far: allocated on a CUDA device, resident on CPU (the job measures
    itself; its record shows it)."""
    import resource

    import torch
    if device.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)


def _train_here(base, examples, schedule, settings: TrainSettings, out_dir: Path, *, quantized: bool,
                checkpointing: bool, progress, should_stop):
    """Steps 3-5 in this process: (the trained PeftModel, {losses, tokens, label_tokens, seconds})."""
    import torch
    total_steps = len(schedule)
    # 3. LoRA (seeded: the A matrices are random).
    peft_model, causal_lm, params = wrap_lora(base.model, settings, quantized=quantized, checkpointing=checkpointing)
    optimizer, scheduler = make_optimizer(params, settings, total_steps)

    # 4. The loop.
    losses, tokens, label_tokens, positions = [], 0, 0, 0
    pad_id = base.tokenizer.pad_token_id
    t0 = time.perf_counter()
    for step, batch in enumerate(schedule, start=1):
        if should_stop is not None and should_stop():
            raise TrainingStopped(f"stopped at step {step - 1}/{total_steps}")
        # Packed: no padding between rows, attention kept within each row by its position ids.
        input_ids, labels, position_ids, real = pack([examples[i] for i in batch], pad_id, settings.max_seq_len)
        input_ids, labels, position_ids = (t.to(base.device) for t in (input_ids, labels, position_ids))
        loss, n = causal_lm_loss(causal_lm, input_ids, labels, None, checkpoint_chunks=checkpointing,
                                 position_ids=position_ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        tokens += real
        positions += input_ids.numel()
        label_tokens += n
        if progress is not None:
            progress(step, total_steps, losses[-1])
    seconds = time.perf_counter() - t0

    # 5. Save a standard PEFT folder (safetensors only).
    save_adapter(peft_model, out_dir)
    return peft_model, {"losses": losses, "tokens": tokens, "label_tokens": label_tokens, "seconds": seconds,
                        "padding_fraction": round(1 - tokens / positions, 4) if positions else 0.0}
