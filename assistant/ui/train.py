"""The Train tab: the dataset's size, training settings as form fields (validated, naming the field), one
Retrain button, the run's stages with a bar each, the loss curve, before/after metrics, the gate's verdict
with Activate anyway, and activate / roll back of versions."""

from __future__ import annotations

import json
import logging

import gradio as gr

from assistant.errors import AssistantError, InvalidSetting
from assistant.jobs.process import RETRY_HINT
from assistant.settings import BASE as BASE_WEIGHTS
from assistant.settings import MAX_LORA_RANK
from assistant.training.recipe import MIN_EXAMPLES, TrainSettings
from assistant.ui import jobview
from assistant.ui.adapters import activate, activate_anyway, rollback
from assistant.ui.common import domain_names, err, field_error, pick, refresh_models, version_choices

log = logging.getLogger(__name__)

JOB_POLL_S = 2.0              # the Train tab's polling period while a job runs
METHODS = ("lora", "qlora")
LEARN_FROM = ("auto", "sft", "sft+dpo", "sft+kto", "sft+dpo+kto", "dpo", "kto")   # TrainSettings.method
DEFAULTS = TrainSettings()    # the recipe's defaults, shown in the form
NO_DOMAINS = "No domains yet: create one in the Adapters tab, or from the Chat tab's model picker (New domain…)."


def default_method(serving) -> str:
    """QLoRA on a 4-bit base, LoRA otherwise."""
    return "qlora" if getattr(serving.base, "quantization", None) == "nf4" else "lora"


LABELS = {"method": "Learn from", "epochs": "Epochs", "learning_rate": "Learning rate", "rank": "Rank",
          "max_seq_len": "Max length (tokens)"}


def _number(value):
    """A form number as the settings take it: whole numbers as int (the browser sends 16.0), empty as None."""
    if value is None or value == "":
        return None
    return int(value) if isinstance(value, float) and value.is_integer() else value


def train_settings(method_default: str, epochs, learning_rate, rank, method, max_len, advanced,
                   defaults: dict | None = None, learn_from: str = "auto") -> TrainSettings:
    """The form -> training settings, checked once by the one checker (TrainSettings.from_dict, on top of
    the server's `defaults`); its error names the form field (advanced settings: the JSON box)."""
    if method not in METHODS:
        raise field_error("Method", f"pick one of {', '.join(METHODS)}")
    if method != method_default:
        raise field_error("Method", f"this server's base trains with {method_default}: qlora needs a "
                                    "4-bit (nf4) base on a CUDA GPU, lora a base that is not 4-bit")
    out = {"learning_rate": _number(learning_rate), "rank": _number(rank), "max_seq_len": _number(max_len)}
    if learn_from not in (None, "", "auto"):
        out["method"] = learn_from
    if _number(epochs) != 0:   # 0 is what the browser shows for an empty field: sized to the dataset, as empty
        out["epochs"] = _number(epochs)
    text = (advanced or "").strip()
    if text:
        try:
            extra = json.loads(text)
        except ValueError:
            raise field_error("Advanced settings", 'must be a JSON object, e.g. {"batch_size": 4}') from None
        if not isinstance(extra, dict):
            raise field_error("Advanced settings", 'must be a JSON object, e.g. {"batch_size": 4}')
        out.update(extra)
    try:
        return TrainSettings.from_dict(out, defaults)
    except InvalidSetting as e:
        problem = e.message.removeprefix("training setting ").removeprefix(f"{e.param} ")   # the label names it
        raise field_error(LABELS.get(e.param, "Advanced settings"), problem) from None


def _job_outputs(workspace, job: dict | None, model, domain=None):
    """-> state line, Cancel, stages, bar, loss plot, log, metrics, gate verdict, Activate anyway, timer,
    model picker, Retry from evaluation (shown only for a failed job whose trained adapter was kept)."""
    import pandas as pd
    losses = pd.DataFrame((job or {}).get("losses") or [], columns=["step", "loss"]).astype(
        {"step": "int64", "loss": "float64"})   # typed, or an empty first frame makes the axes nominal
    blocked = bool(job) and job["status"] == "succeeded" and not job.get("promoted") and bool(job.get("adapter_version"))
    running = bool(job) and job["status"] not in jobview.TERMINAL
    domain = domain or (job or {}).get("domain")
    try:
        active = workspace.require_domain(domain).active_version if domain else None
    except AssistantError:
        active, domain = None, None
    return (jobview.state_text(job, active, domain), gr.update(interactive=running),
            jobview.stages_html(job), jobview.progress_html(job), losses, jobview.public_log(job),
            jobview.metrics_table(job), jobview.gate_markdown(job), gr.update(visible=blocked),
            gr.Timer(active=running), refresh_models(workspace, model),
            gr.update(visible=bool(job) and job["status"] == "failed" and RETRY_HINT in (job.get("error") or "")))


N_JOB_OUT = 12
LOSS_OUT = 4                  # the loss plot's place in `_job_outputs`


def train_view(workspace, domain, model):
    """Dataset size, latest job (also after a reload or a restart) and versions of a domain."""
    if not domain:
        text = NO_DOMAINS if not domain_names(workspace) else "Pick a domain."
        return (text, None, gr.update(choices=[], value=None), *_job_outputs(workspace, None, model))
    try:
        report = workspace.preview(domain).report
        d = workspace.require_domain(domain)
        jobs = workspace.jobs(domain)
    except AssistantError as e:
        return (err(e), None, gr.update(), *_job_outputs(workspace, None, model))
    size = (f"**{report['kept']}** curated examples ({report['train']} train / {report['eval']} eval) · training "
            f"needs at least {MIN_EXAMPLES}")
    learn = workspace.training_methods(domain)
    auto = " + ".join(m.upper() for m in learn["auto"]) or "nothing yet"
    size += (f"\n\nRatings: {learn['summary']} (auto runs {auto}; pick a method under Learn from; "
             f"{learn['needs']})")
    pending = report["removed"].get("pending", 0)
    if pending:
        size += (f"\n\n**{pending} pending** rating{'s' if pending != 1 else ''} or correction"
                 f"{'s' if pending != 1 else ''} from user accounts wait for review in the Data tab: they train "
                 "once an editor approves them.")
    if report["kept"] < MIN_EXAMPLES:
        size += (f"\n\nAdd {MIN_EXAMPLES - report['kept']} more: import seed examples in the Data tab, or correct "
                 f"answers of {domain} in the Chat tab.")
    job = workspace.job(jobs[0]["job_id"]) if jobs else None
    choices = version_choices(d.versions)
    versions = gr.update(choices=choices, value=d.active_version or BASE_WEIGHTS)
    return (size, job["job_id"] if job else None, versions, *_job_outputs(workspace, job, model, domain))


def retrain(workspace, method_default, domain, epochs, learning_rate, rank, method, max_len, advanced, model,
            learn_from="auto"):
    """-> the form's error line (in place, naming the field), job id, the job outputs."""
    try:
        if not domain:
            raise field_error("Domain", "pick a domain")
        settings = train_settings(method_default, epochs, learning_rate, rank, method, max_len, advanced,
                                  workspace.settings.train, learn_from)
        job_id = workspace.start_training(domain, settings)
    except AssistantError as e:
        return (err(e), gr.skip(), *(gr.skip() for _ in range(N_JOB_OUT)))
    return ("", job_id, *_job_outputs(workspace, workspace.job(job_id), model, domain))


def poll_job(workspace, job_id, model, seen):
    """One timer tick: re-render when the job moved (the running stage's heartbeat counts), the loss plot
    only when it has a new point (the browser redraws the plot otherwise)."""
    try:
        job = workspace.job(job_id) if job_id else None
    except AssistantError:
        job = None
    now = jobview.stamp(job)
    points = len((job or {}).get("losses") or [])
    if now is not None and seen and now == seen[0]:
        return (*(gr.skip() for _ in range(N_JOB_OUT)), seen)
    out = list(_job_outputs(workspace, job, model))
    if seen and points == seen[1] and points:
        out[LOSS_OUT] = gr.skip()
    return (*out, [now, points])


def cancel(workspace, job_id, model):
    try:
        if not job_id:
            raise field_error("Job", "no training job to cancel")
        job = workspace.cancel_job(job_id)
    except AssistantError as e:
        return err(e), *(gr.skip() for _ in range(N_JOB_OUT))
    return "", *_job_outputs(workspace, job, model)


def retry(workspace, job_id, model):
    """Retry a failed job from evaluation (its trained adapter was kept)."""
    try:
        if not job_id:
            raise field_error("Job", "no training job to retry")
        job = workspace.retry_job(job_id)
    except AssistantError as e:
        return err(e), *(gr.skip() for _ in range(N_JOB_OUT))
    return "", *_job_outputs(workspace, job, model)


def versions(workspace, domain, current=None):
    if not domain:
        return gr.update(choices=[], value=None)
    try:
        d = workspace.require_domain(domain)
    except AssistantError:
        return gr.update(choices=[], value=None)
    choices = version_choices(d.versions)
    return gr.update(choices=choices, value=d.active_version or pick(current, choices) or BASE_WEIGHTS)


def published(job_id, workspace):
    """The version the last job published (for Activate anyway)."""
    try:
        return workspace.job(job_id).get("adapter_version") if job_id else None
    except AssistantError:
        return None


def activate_published(serving, domain, job_id, model, request: gr.Request):
    return activate_anyway(serving, domain, published(job_id, serving.workspace), model, request)


def build(workspace, serving, P, model):
    """The Train tab's widgets and its own events."""
    job_id = gr.State(None)
    seen = gr.State(None)       # what the last timer tick rendered
    timer = gr.Timer(JOB_POLL_S, active=False)
    names = domain_names(workspace)
    domain = gr.Dropdown(names, value=names[0] if names else None, label="Domain", elem_id="train-domain")
    size = gr.Markdown(NO_DOMAINS if not names else "", elem_id="train-dataset")
    with gr.Row():
        # no minimum/maximum on the fields: Gradio would refuse the value with a toast that names no field;
        # train_settings checks them and names the field under the form
        epochs = gr.Number(None, label="Epochs (0 or empty = auto)", precision=0, elem_id="train-epochs")
        lr = gr.Number(DEFAULTS.learning_rate, label="Learning rate", elem_id="train-lr")
        rank = gr.Number(DEFAULTS.rank, label=f"Rank (1-{MAX_LORA_RANK})", precision=0, elem_id="train-rank")
        max_len = gr.Number(DEFAULTS.max_seq_len, label="Max length (tokens)", precision=0, elem_id="train-max-len")
        method = gr.Radio(list(METHODS), value=default_method(serving), label="Method", elem_id="train-method")
    learn_from = gr.Radio(list(LEARN_FROM), value="auto", elem_id="train-learn-from",
                          label="Learn from (SFT: examples and corrections; DPO: corrections over the answers they "
                                "fixed, liked over disliked answers to one question; KTO: thumbs up and down)")
    with gr.Accordion("Advanced (JSON: batch_size, augment, replay, alpha, dropout, seed…)", open=False,
                      elem_id="train-advanced-box"):
        advanced = gr.Textbox("", label="More settings as a JSON object", placeholder='{"batch_size": 4}',
                              elem_id="train-advanced")
    form_error = gr.Markdown("", elem_id="train-form-error")
    with gr.Row():
        go = gr.Button("Retrain", variant="primary", elem_id="retrain-btn")
        cancel_btn = gr.Button("Cancel job", variant="stop", elem_id="cancel-job-btn", interactive=False)
        retry_btn = gr.Button("Retry from evaluation", elem_id="retry-job-btn", visible=False)
    status = gr.Markdown("", elem_id="train-status")
    stages = gr.HTML(jobview.stages_html(None), elem_id="train-stages-box")
    bar = gr.HTML(jobview.progress_html(None), elem_id="train-progress")
    verdict = gr.Markdown("", elem_id="train-summary")
    anyway = gr.Button("Activate anyway", visible=False, elem_id="train-activate-anyway")
    with gr.Row():
        loss = gr.LinePlot(x="step", y="loss", title="Training loss", elem_id="loss-plot", height=260,
                           x_title="optimizer step", y_title="loss", x_axis_format="d", y_axis_format=".2f")
        metrics = gr.Dataframe(headers=["metric", "before", "after"], label="Before / after", interactive=False,
                               elem_id="job-metrics")
    job_log = gr.Textbox(label="Job log", lines=6, max_lines=16, elem_id="job-log", interactive=False)
    with gr.Row():
        version = gr.Dropdown([], label="Version", elem_id="train-version")
        act = gr.Button("Activate", elem_id="train-activate-btn")
        back = gr.Button("Roll back to previous", elem_id="rollback-btn")
    vstatus = gr.Markdown("", elem_id="train-version-status")

    job_out = [status, cancel_btn, stages, bar, loss, job_log, metrics, verdict, anyway, timer, model, retry_btn]
    view_out = [size, job_id, version, *job_out]
    domain.change(P(train_view, workspace), [domain, model], view_out)
    go.click(P(retrain, workspace, default_method(serving)), [domain, epochs, lr, rank, method, max_len, advanced, model,
                                                              learn_from], [form_error, job_id, *job_out])
    cancel_btn.click(P(cancel, workspace), [job_id, model], [form_error, *job_out])
    retry_btn.click(P(retry, workspace), [job_id, model], [form_error, *job_out])
    timer.tick(P(poll_job, workspace), [job_id, model, seen], [*job_out, seen], concurrency_limit=None)
    verdict.change(P(versions, workspace), [domain, version], [version])
    anyway.click(P(activate_published, serving), [domain, job_id, model], [vstatus, model]).then(
        P(versions, workspace), [domain], [version])
    act.click(P(activate, serving), [domain, version, model], [vstatus, model]).then(
        P(versions, workspace), [domain, version], [version])
    back.click(P(rollback, serving), [domain, model], [vstatus, model]).then(P(versions, workspace), [domain], [version])
    return dict(domain=domain, view_out=view_out)
