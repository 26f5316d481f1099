"""The workspace: everything the app keeps except the model. Domains, adapter versions and their cards,
the response log and feedback, seed examples and review, curation and dataset snapshots, training jobs,
evaluation and monitoring. Creating one is cheap (a SQLite file and two folders): the CLI's data commands
run on a Workspace and never load the chat model; `Serving` (serving.py) adds the model on top of one.

Every job the UI, the API and the CLI do on the data is one method here, so all three behave the same.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable

from assistant.data.registry import Registry, check_name, check_version
from assistant.data.rollouts import Rollouts
from assistant.data.stored_responses import StoredResponses
from assistant.errors import AssistantError, Conflict, ModelLoadError, ModelNotFound, NotFound
from assistant.settings import BASE, MAX_MESSAGE_CHARS, Settings

SNAPSHOT_NAME_CHARS = 12     # hash characters in an exported snapshot's file name
DEFAULT_LOG_ROWS = 20        # `assistant logs` without -n
HISTORY_ROWS = 20            # audit entries shown on a version's card

log = logging.getLogger(__name__)

Loader = Callable[[str, str], None]   # (domain, version): validate and load, or raise


class Workspace:
    def __init__(self, settings: Settings, *, recover_jobs: bool = False):
        """`recover_jobs`: mark jobs left running by a server or worker that died as failed (the server does
        this at start; one-shot commands do not, since a server may be running them)."""
        from assistant.data.store import Store
        self.settings = settings.ensure_dirs()
        self.store = Store(settings.database)
        self.registry = Registry(settings.adapters_path)
        self.rollouts = Rollouts(self.store)
        self.stored_responses = StoredResponses(self.store)   # the Responses API's `store`
        from assistant.people.users import Directory
        self.directory = Directory(self.store)   # stored users, personal keys, the audit log
        from assistant.people.quotas import Quotas
        self.quotas = Quotas(self.store, settings.user_requests_per_minute, settings.user_tokens_per_day)
        self._curator = None
        self._indexer = None
        self.log_failures = 0   # answers the response log could not store (Serving counts them; /metrics shows them)
        # {"<domain>@vN": {"reason", "attempts", "retry_in_s"}} of versions the serving engine refused to load
        # (a vLLM server's reason); Serving sets it. Shown in /api/domains, the Adapters tab and /metrics.
        self.engine_refusals: Callable[[], dict[str, dict]] = dict
        if recover_jobs:
            from assistant.jobs import run as jobs
            jobs.recover_orphans(self.settings, self.store, self.registry)

    def close(self) -> None:
        from assistant.monitoring.report import close_exporter
        close_exporter(self)
        if self._indexer is not None:
            self._indexer.shutdown(wait=True)

    # Domains and adapter versions --------------------------------------------------------------
    def require_domain(self, name: str):
        check_name(name)
        if not self.registry.exists(name):
            raise NotFound(f"no domain {name!r}: create it first (POST /api/domains or the Adapters tab)")
        return self.registry.get_domain(name)

    def create_domain(self, name: str, system_prompt: str | None = "", description: str | None = "",
                      trust_users: bool = False) -> dict:
        return self.registry.create_domain(name, "" if system_prompt is None else system_prompt,
                                           "" if description is None else description, trust_users).as_dict()

    def list_domains(self) -> list[dict]:
        out = []
        for d in self.registry.list_domains():
            item = d.as_dict()
            item["examples"] = self.store.count_examples(d.name)
            refused = self.refused_versions(d.name)
            item["refused_versions"] = refused
            if d.active_version in refused and not d.problem:
                item["status"], item["problem"] = "broken", refused[d.active_version]
            out.append(item)
        return out

    def refused_versions(self, domain: str) -> dict[str, str]:
        """{version: why} of the domain's versions the serving engine refused (each retried with backoff)."""
        out = {}
        for key, r in self.engine_refusals().items():
            name, _, version = key.partition("@")
            if name == domain:
                out[version] = (f"the serving engine refused {key}: {r['reason']} (tried {r['attempts']} time(s); "
                                f"next try in {r['retry_in_s']:.0f} s)")
        return out

    def adapters(self, domain: str) -> list[dict]:
        self.require_domain(domain)
        return self.registry.adapters(domain)

    def live_versions(self) -> dict[str, Path]:
        """{"<domain>@vN": its folder} of every domain's active version: what must be loaded to serve."""
        out = {}
        for d in self.registry.list_domains():
            if d.active_version and not d.problem:
                out[f"{d.name}@{d.active_version}"] = self.registry.version_path(d.name, d.active_version)
        return out

    def active_version(self, domain: str) -> str | None:
        return self.registry.active_version(domain)

    def card(self, domain: str, version: str) -> dict:
        self.require_domain(domain)
        check_version(version)
        return self.registry.read_card(domain, version)

    def activate(self, domain: str, version: str, *, load: Loader, user: str | None = None,
                 override: bool = False) -> dict:
        """Promote or roll back: `load` validates and loads the version before the pointer moves, so a
        broken adapter never replaces the one serving. `override`: a person activates a version the gate
        did not promote; the card records who and when. `version` "base" goes back to the base weights
        (the domain's system prompt alone)."""
        self.require_domain(domain)
        if version == BASE:
            self.registry.deactivate(domain)
            return {"domain": domain, "active_version": None}
        check_version(version)
        gate = self.registry.gate_verdict(domain, version)
        if gate.get("promote") is False and not override:
            raise Conflict(f"the gate did not promote {domain}@{version}: {gate.get('summary') or 'see its card'}. "
                           "Activate it anyway with override (the Activate anyway button, or "
                           '{"override": true} in the request body); the card records who did it',
                           param="override")
        self.registry.activate(domain, version, load=load)
        if override:
            self.registry.record_override(domain, version, user)
        try:   # replicas on the same database load it now (replicas.py)
            self.store.record_activation(domain, version, by=user)
        except Exception:  # noqa: BLE001 - the pointer moved; replicas still see it when their cache ages out
            log.exception("could not record the activation of %s@%s for other replicas", domain, version)
        return {"domain": domain, "active_version": version}

    def rollback(self, domain: str, *, load: Loader, user: str | None = None) -> dict:
        """Activate the newest version older than the active one (from the oldest: the base weights)."""
        self.require_domain(domain)
        with self.registry.activation_lock(domain):   # the version it leaves is still live when it moves
            return self.activate(domain, self.registry.previous_version(domain), load=load, user=user)

    # Feedback, examples and review -------------------------------------------------------------
    def feedback(self, response_id: str, rating: str, correction: str | None = None, reason: str | None = None,
                 user: str | None = None, principal: str | None = None, role: str | None = None) -> int:
        """A rating (and optionally a reason and a corrected answer) on a logged response -> its id. `user`:
        who rated, as the request names them; `principal`: who authenticated (kept apart); `role`: theirs
        (users.ROLES): a `user` rates only answers given to them, and their feedback waits for review."""
        if rating not in ("up", "down"):
            raise AssistantError("rating must be 'up' or 'down'", param="rating")
        for name, value in (("correction", correction), ("reason", reason)):
            if value is not None and (not isinstance(value, str) or len(value) > MAX_MESSAGE_CHARS):
                raise AssistantError(f"{name} must be text of at most {MAX_MESSAGE_CHARS} characters", param=name)
        if correction is not None and not correction.strip():
            correction = None
        if role == "user":
            self._own_response(response_id, principal)
        fid = self.store.add_feedback(response_id=response_id, rating=rating, correction=correction,
                                      reason=reason, user=user, principal=principal, role=role)
        self._check_new(response_id, correction, fid, rating)
        return fid

    def version_history(self, domain: str, version: str) -> list[dict]:
        """What people did to a version (its activations, overrides), newest first: the audit log's entries."""
        return self.directory.audit_log(domain=domain, target=version, limit=HISTORY_ROWS)

    def feedback_list(self, domain: str | None = None) -> list[dict]:
        """Ratings in force (not withdrawn), oldest first, with the answer they rate."""
        keep = ("id", "response_id", "rating", "correction", "reason", "user", "principal", "created_at", "domain",
                "adapter_version", "answer", "history")
        return [{k: f.get(k) for k in keep} for f in self.store.list_feedback(domain)]

    def _own_response(self, response_id: str, principal: str | None) -> None:
        """A user account acts only on answers given to it: another's answer is as good as absent."""
        response = self.store.get_response(response_id) if isinstance(response_id, str) else None
        if response is None or response.get("principal") != principal:
            raise NotFound(f"no response with id {str(response_id)[:64]!r} among your answers", param="response_id")

    def withdraw_feedback(self, response_id: str, user: str | None = None, principal: str | None = None) -> bool:
        """Undo a user's rating of an answer: it counts nowhere and its dataset row goes (the record keeps
        it as history). -> whether there was a rating to undo."""
        if not isinstance(response_id, str) or not response_id:
            raise AssistantError("response_id is required", param="response_id")
        if self.store.get_response(response_id) is None:
            raise NotFound(f"no response with id {response_id[:64]!r}", param="response_id")
        return self.store.withdraw_feedback(response_id=response_id, user=user, principal=principal)

    def _check_new(self, response_id: str, correction: str | None, feedback_id: int, rating: str) -> None:
        """Incremental near-duplicate check when an item arrives: in the background, so a feedback post
        never waits for the embedder. Items that are not near-duplicates join the domain's index."""
        if correction is None and rating != "up":
            return
        if self._indexer is None:
            from concurrent.futures import ThreadPoolExecutor
            self._indexer = ThreadPoolExecutor(1, thread_name_prefix="dedup-index")

        def check():
            try:
                resp = self.store.get_response(response_id)
                if not resp or resp["domain"] == BASE:
                    return
                item = resp["messages"] + [{"role": "assistant", "content": correction or resp["answer"]}]
                curator = self.curator()
                self._fresh_index(curator, resp["domain"])
                key, sim = curator.check_new(resp["domain"], item)
                if key is None or sim < curator.options.near_dup_threshold:
                    curator.add_to_index(resp["domain"], f"feedback:{feedback_id}", item)
            except Exception:  # noqa: BLE001 - curation re-checks everything anyway
                log.exception("near-duplicate check failed for feedback %s", feedback_id)
        self._indexer.submit(check)

    def _fresh_index(self, curator, domain: str) -> None:
        """On a shared database other replicas accept items too: an index older than INDEX_MAX_AGE_S is
        rebuilt from the database before it is checked against (replicas.py)."""
        if self.store.kind != "postgresql":
            return
        import time

        from assistant.replicas import INDEX_MAX_AGE_S, rebuild_index
        keys = curator.index_path(domain).with_name(domain + ".keys.json")
        try:
            age = time.time() - keys.stat().st_mtime
        except FileNotFoundError:
            age = float("inf")
        if age > INDEX_MAX_AGE_S:
            rebuild_index(curator, self.store, domain)

    def logs(self, domain: str | None = None, limit: int = DEFAULT_LOG_ROWS) -> list[dict]:
        """The latest responses, newest first, each with its feedback (`assistant logs`)."""
        if domain is not None and domain != BASE:
            self.require_domain(domain)
        if not isinstance(limit, int) or limit < 1:
            raise AssistantError("the number of responses must be a whole number of at least 1", param="limit")
        rows = self.store.recent_responses(domain, limit)
        feedback = self.store.feedback_for([r["id"] for r in rows])
        for r in rows:
            r["feedback"] = feedback.get(r["id"], [])
        return rows

    def add_examples(self, domain: str, examples, user: str | None = None) -> dict:
        self.require_domain(domain)
        if not isinstance(examples, list) or not examples:
            raise AssistantError("examples must be a non-empty list of {\"messages\": [...]} objects",
                                 param="examples")
        added, rejected = self.store.add_examples(domain, examples, source="seed", user=user)
        if not added:   # nothing usable: a client error, and nothing was written
            first = rejected[0]
            raise AssistantError(f"no example was added: examples[{first['index']}]: {first['reason']}"
                                 + (f" (and {len(rejected) - 1} more rejected)" if len(rejected) > 1 else ""),
                                 param="examples")
        return {"added": added, "rejected": rejected}

    def import_seed_jsonl(self, domain: str, text: str, user: str | None = None) -> dict:
        """Seed examples from JSON Lines text -> {added, problems: [line/example messages], message}."""
        from assistant.data.seeds import parse_jsonl, summary
        self.require_domain(domain)
        examples, problems = parse_jsonl(text)
        res = self.add_examples(domain, examples, user=user) if examples else {"added": 0, "rejected": []}
        problems += [f"example {r['index'] + 1}: {r['reason']}" for r in res["rejected"]]
        return {"added": res["added"], "problems": problems, "message": summary(res["added"], problems)}

    def review_queue(self, domain: str) -> list[dict]:
        self.require_domain(domain)
        return self.curator().review_queue(domain)

    def review(self, domain: str, key: str, status: str | None, messages: list | None = None) -> None:
        """Approve / reject (status) a candidate, or replace its messages (an edit)."""
        self.require_domain(domain)
        if not isinstance(key, str) or not key.startswith(("example:", "feedback:")):
            raise AssistantError("pick a row of the review queue first", param="key")
        try:
            self.store.set_review(domain, key, status, messages)
        except ValueError as e:
            raise AssistantError(str(e)) from None

    def review_many(self, domain: str, keys: list[str], status: str | None) -> int:
        """Approve, reject or clear (None) many candidates at once; every key must name one of the domain's."""
        self.require_domain(domain)
        known = {c["key"] for c in self.store.candidates(domain)}
        missing = [k for k in keys if k not in known]
        if missing:
            raise NotFound(f"keys: no item {str(missing[0])[:64]!r} in {domain}: the review queue lists them",
                           param="keys")
        for key in keys:
            self.review(domain, key, status)
        return len(keys)

    def edit_item(self, domain: str, key: str, prompt: str, answer: str) -> None:
        """A reviewer's edit of a candidate's last question and answer; the edited item is approved."""
        item = next((c for c in self.store.candidates(self.require_domain(domain).name) if c["key"] == key), None)
        if item is None:
            raise NotFound("that item is no longer in the review queue: refresh it", param="key")
        messages = [dict(m) for m in item["messages"]]
        for role, text, field_name in (("user", prompt, "prompt"), ("assistant", answer, "answer")):
            if not (text or "").strip():
                raise AssistantError(f"{field_name} is empty: write the text or reject the item", param=field_name)
            idx = max(i for i, m in enumerate(messages) if m["role"] == role)
            messages[idx]["content"] = text
        self.review(domain, key, "approved", messages)

    # Curation ----------------------------------------------------------------------------------
    def curator(self):
        if self._curator is None:
            from assistant.data.curation import Curator
            self._curator = Curator(self.store, self.settings,
                                    trusts_users=lambda domain: self.registry.get_domain(domain).trust_users)
        return self._curator

    def curate(self, domain: str):
        """Curate and write the snapshot (a job taking the data, an export)."""
        self.require_domain(domain)
        return self.curator().snapshot(domain)

    def preview(self, domain: str):
        """The curation report without writing anything (the Data tab, GET .../dataset)."""
        self.require_domain(domain)
        return self.curator().preview(domain)

    # Embeddings (POST /v1/embeddings) ----------------------------------------------------------
    def embedding_model(self) -> str:
        """The API's name for the curation embedder (`--curation.embedding-model`): all-MiniLM-L6-v2 by default."""
        from assistant.data.embeddings import served_name
        return served_name(self.curator().options.embedding_model)

    def embed(self, model: str, texts: list[str], dimensions: int | None = None) -> tuple:
        """(normalized float32 vectors (len(texts), dim), each text's tokens) by the curation embedder: the one
        instance curation and monitoring use, loaded on first use. Refused, naming the field: another `model`,
        `dimensions` other than the model's own, a text longer than the model reads (it would be cut)."""
        from assistant.data.curation import default_embedder
        from assistant.data.embeddings import MODEL_ID, PACKAGED_NAMES
        name = self.embedding_model()
        if model != name and not (name == MODEL_ID and model in PACKAGED_NAMES):
            raise ModelNotFound(f"the model {model[:80]!r} does not embed: POST /v1/embeddings takes model {name!r} "
                                "(GET /v1/models lists it; the other models there chat)", param="model")
        embedder = default_embedder(self.curator().options.embedding_model)
        try:
            counts, limit = embedder.token_counts(texts), embedder.max_tokens
        except ModelLoadError:   # its message may name a folder of this server: the log has it
            raise ModelLoadError(f"the embedding model {name!r} cannot be loaded (the server log says why): the "
                                 "operator names another with --curation.embedding-model") from None
        if dimensions is not None and dimensions != embedder.dim:
            raise AssistantError(f"dimensions: {name} makes {embedder.dim}-dimensional vectors only: send "
                                 f"{embedder.dim} or leave dimensions out", param="dimensions")
        for i, n in enumerate(counts):
            if n > limit:
                where = f"input[{i}]" if len(texts) > 1 else "input"
                raise AssistantError(f"{where} is {n} tokens; {name} reads at most {limit} (with its 2 special "
                                     "tokens) and would cut the rest: split the text", param="input")
        return embedder.embed(texts), counts

    def training_methods(self, domain: str) -> dict:
        """What the domain's ratings support, read-only: {"counts", "supported", "summary", "auto", "needs"}
        ("40 ratings (...), 12 corrections: SFT + DPO + KTO")."""
        from assistant.data import preference
        from assistant.settings import group_settings
        from assistant.training.recipe import MIN_EXAMPLES
        snap = self.preview(domain)
        data = preference.build(snap.rows, self.store.list_feedback(domain), group_settings(self.settings, "curation"))
        can = preference.supported(data.counts)
        return {"counts": data.counts, "supported": can, "summary": preference.describe(data.counts, can),
                "auto": preference.auto_methods(data.counts, preference.sft_rows(snap, data), MIN_EXAMPLES),
                "needs": f"DPO needs {preference.MIN_PAIRS}+ pairs (corrections, or a liked and a disliked answer "
                         f"to one question), KTO {preference.MIN_PER_KIND}+ ratings of each kind"}

    def export_dataset(self, domain: str, folder: Path | None = None):
        """The user exports the dataset: the snapshot is written (and recorded); with `folder`, also a copy
        named `<domain>-<hash>.jsonl` there (outside the state folder) -> its path."""
        snap = self.curate(domain)
        if folder is None:
            return snap
        out = Path(folder) / f"{domain}-{snap.hash[:SNAPSHOT_NAME_CHARS]}.jsonl"
        if not out.exists():
            shutil.copyfile(snap.path, out)
        return out

    def dataset_file(self, domain: str) -> tuple[bytes, str]:
        """The curated rows as JSON Lines and a file name for them, without writing anything."""
        from assistant.data.curation import snapshot_bytes
        snap = self.preview(domain)
        return snapshot_bytes(snap.rows), f"{domain}-{snap.hash[:SNAPSHOT_NAME_CHARS]}.jsonl"

    # Training, evaluation and monitoring -------------------------------------------------------
    def train_settings(self, values: dict | None = None):
        """The one check of training settings (TrainSettings.from_dict): this server's `--train.*` defaults,
        then `values` (a form's, an API body's) -> a TrainSettings; an InvalidSetting names the field."""
        from assistant.training.recipe import TrainSettings
        return TrainSettings.from_dict(values, self.settings.train)

    def start_training(self, domain: str, train_settings=None) -> str:
        """A background training job (its own process) -> the job id to follow. `train_settings`: a
        TrainSettings from `train_settings`, or overrides that are checked by it here."""
        from assistant.jobs import run as jobs
        self.require_domain(domain)
        return jobs.start_job(self.settings, self.store, self.registry, domain, self.train_settings_of(train_settings))

    def train_settings_of(self, value):
        from assistant.training.recipe import TrainSettings
        return value if isinstance(value, TrainSettings) else self.train_settings(value)

    def train(self, domain: str, train_settings: dict | None = None) -> dict:
        """The same job, blocking, in this process, with a progress bar (the CLI) -> the job record."""
        from assistant.engine.threads import use_all_cores
        from assistant.jobs import run as jobs
        self.require_domain(domain)
        use_all_cores()   # this process only trains (see assistant/engine/threads.py)
        return jobs.run_job_inline(self.settings, self.store, self.registry, domain,
                                   self.train_settings_of(train_settings))

    def work(self, max_jobs: int | None = None) -> int:
        """`assistant worker`: claim queued training jobs from the database and run them here, one at a
        time, until stopped (jobs/workers.py) -> how many ran."""
        from assistant.jobs.workers import run_worker
        return run_worker(self.settings, self.store, self.registry, max_jobs=max_jobs)

    def evaluate(self, domain: str, version: str | None = None) -> dict:
        """Before/after metrics and the gate's verdict for a version on the domain's held-out data."""
        from assistant.gate import evaluation
        self.require_domain(domain)
        if version is not None:
            check_version(version)
        return evaluation.evaluate_version(self.settings, self.store, self.registry, domain, version)

    def job(self, job_id: str) -> dict:
        job = self.store.get_job(job_id) if isinstance(job_id, str) else None
        if job is None:
            raise NotFound(f"no job {str(job_id)[:64]!r}")
        return job

    def cancel_job(self, job_id: str) -> dict:
        from assistant.jobs import run as jobs
        self.job(job_id)
        jobs.cancel_job(self.settings, self.store, job_id)
        return self.job(job_id)

    def retry_job(self, job_id: str, *, wait: bool = False) -> dict:
        """Resume a failed job from evaluation, with the adapter its training kept (409 when it cannot); with
        `wait`, in this process until it ends."""
        from assistant.jobs import run as jobs
        self.job(job_id)
        jobs.retry_job(self.settings, self.store, self.registry, job_id, inline=wait)
        return self.job(job_id)

    def jobs(self, domain: str | None = None) -> list[dict]:
        if domain is not None:
            self.require_domain(domain)
        return self.store.list_jobs(domain)

    def metrics(self, domain: str) -> dict:
        from assistant.monitoring.report import domain_metrics
        self.require_domain(domain)
        return domain_metrics(self, domain)

    def canary_settings(self, **overrides):
        from assistant.settings import group_settings
        return group_settings(self.settings, "canary", **overrides)

    def canary(self, domain: str) -> dict | None:
        """The domain's running canary rollout (or its last one) with both arms' ratings and the rule's
        verdict (monitoring/canary.py); None when it never had one."""
        from assistant.monitoring.canary import report
        self.require_domain(domain)
        return report(self.rollouts, self.rollouts.latest(domain), self.canary_settings())

    def prometheus_text(self) -> str:
        """`GET /metrics`: counters and histograms from the store, drift from a cache refreshed in the
        background (a scrape never embeds anything)."""
        from assistant.monitoring.report import prometheus_text
        from assistant.settings import group_settings
        return prometheus_text(self, group_settings(self.settings, "monitor"))
