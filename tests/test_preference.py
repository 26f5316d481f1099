"""Preference tuning from ratings: the rows a domain's ratings give (DPO pairs from corrections, KTO rows
from thumbs), the methods they support and the refusal when they support none, and jobs that run trl's
DPO / KTO trainers on the tiny Llama: over HTTP (promoted or blocked with a reason), QLoRA + KTO on an NF4
and an int8 base, KTO in two data-parallel processes, and a cancel in the middle of KTO that leaves nothing behind."""

from __future__ import annotations

import json
import os
import time
import uuid

import httpx
import pytest

from assistant.errors import DatasetTooSmall

from helpers import running_server
from invented_facts import FACTS, SYSTEM_PROMPT, chat

FAST = {"rank": 4, "alpha": 8, "learning_rate": 0.02, "epochs": 1, "batch_size": 4, "max_seq_len": 96,
        "replay": 0, "augment": 0, "preference_epochs": 1, "preference_learning_rate": 0.005}
LONG = " It is a fact that many people have asked about over the years, in many places and at many times."


def rate(store, domain: str, question: str, answer: str, rating: str, *, correction: str | None = None,
         user: str | None = None, finish_reason: str = "stop") -> str:
    """Log an answer to `question` as the server would, and rate it."""
    rid = f"chatcmpl-{uuid.uuid4().hex[:12]}"
    store.log_response(id=rid, domain=domain, adapter_version=None, model=domain,
                       messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}],
                       answer=answer, prompt_tokens=10, completion_tokens=10, latency_ms=1.0, ttft_ms=None,
                       finish_reason=finish_reason, user=user)
    store.add_feedback(response_id=rid, rating=rating, correction=correction, user=user)
    return rid


def rated_domain(store, registry, domain="atlas", *, seeds=8, corrections=6, ups=6, downs=6, cut="stop"):
    """Seeds, corrected answers (the wrong capital), short answers rated up, overlong ones rated down (their
    finish reason `cut`: "length" when their token limit cut them)."""
    registry.create_domain(domain, SYSTEM_PROMPT, "invented facts")
    if seeds:
        store.add_examples(domain, [{"messages": chat(q, a)} for q, a, _, _ in FACTS[:seeds]])
    facts = FACTS[seeds:] + FACTS[:seeds]
    for i in range(corrections):
        q, a, _, _ = facts[i % len(facts)]
        rate(store, domain, q if i < len(facts) else f"{q} (again {i})", "I am not sure, sorry." + LONG, "down",
             correction=a)
    for i in range(ups):
        q, a, _, p = facts[(corrections + i) % len(facts)]
        rate(store, domain, p, a, "up")
    for i in range(downs):
        q, a, _, p = facts[(corrections + ups + i) % len(facts)]
        rate(store, domain, f"{p} Tell me.", a + LONG, "down", finish_reason=cut)


@pytest.fixture
def world(tiny_settings):
    from assistant.data.registry import Registry
    from assistant.data.store import Store
    return tiny_settings, Store(tiny_settings.db_path), Registry(tiny_settings.adapters_path)


def test_ratings_become_pairs_and_kto_rows(world):
    from assistant.data import preference
    from assistant.data.curation import curate
    settings, store, registry = world
    rated_domain(store, registry)
    # a rejected answer with an e-mail address is scrubbed; the same prompt rated down twice is one row
    rate(store, "atlas", "How do I reach Quillton?", "Write to mayor@quillton.example for it." + LONG, "down")
    rate(store, "atlas", "How do I reach Quillton?", "Nobody knows, truly." + LONG, "down")
    # one prompt with a liked and a disliked answer keeps both: the most telling rows for KTO
    rate(store, "atlas", "Where is Quillton?", "Quillton is the capital of Zorbania.", "up")
    rate(store, "atlas", "Where is Quillton?", "Quillton is somewhere." + LONG, "down")
    snap = curate(store, "atlas", settings)
    data = preference.build(snap.rows, store.list_feedback("atlas"), preference_opts(settings))
    corrected = [p for p in data.pairs if p.get("from") != "ratings"]
    assert len(corrected) == 6 and all(p["rejected"].startswith("I am not sure") for p in corrected)
    assert {p["chosen"] for p in corrected} <= {a for _, a, _, _ in FACTS}
    # a liked and a disliked answer to one question are also a pair
    [rated] = [p for p in data.pairs if p.get("from") == "ratings"]
    assert rated["prompt"][-1]["content"] == "Where is Quillton?" and rated["chosen"].startswith("Quillton is the")
    assert rated["rejected"].startswith("Quillton is somewhere") and data.counts["rated_pairs"] == 1
    liked = [r for r in data.kto if r["label"]]
    disliked = [r for r in data.kto if not r["label"]]
    assert len(liked) == 7 and len(disliked) == 8           # + one of the two "How do I reach" ratings
    assert {r["label"] for r in data.kto if r["prompt"][-1]["content"] == "Where is Quillton?"} == {True, False}
    assert not preference.build(snap.rows, [], preference_opts(settings)).pairs   # no ratings, no pairs
    assert all(LONG in r["completion"] for r in disliked)
    assert not any("@" in r["completion"] for r in disliked)
    assert data.counts["removed"]["duplicate_prompt"] == 1
    counts = data.counts
    assert counts["ratings"] == 6 + 6 + 6 + 4 and counts["corrections"] == 6
    # with 10+ thumbs of each kind a share is held out for the gate and trained on by no method;
    # corrections always train
    rated_domain(store, registry, "more", corrections=6, ups=12, downs=12)
    more = preference.build(curate(store, "more", settings).rows, store.list_feedback("more"), preference_opts(settings))
    held = [r for r in more.pairs + more.kto if r["split"] == "eval"]
    assert {True, False} == {r["label"] for r in held} and more.counts["heldout"] == len(more.heldout()) == len(held)
    assert more.counts["pairs"] == 6 and not [r for r in data.kto if r["split"] == "eval"]
    assert more.heldout_keys() == {r["key"] for r in held}
    assert preference.supported({"pairs": 4, "desirable": 4, "undesirable": 4}) == ["sft", "dpo", "kto"]
    assert preference.supported({"pairs": 3, "desirable": 9, "undesirable": 3}) == ["sft"]
    assert preference.describe(counts, ["sft", "dpo", "kto"]).endswith("6 corrections: SFT + DPO + KTO")
    assert preference.class_weights({"desirable": 3, "undesirable": 12}) == (4.0, 1.0)
    assert preference.class_weights({"desirable": 10, "undesirable": 5}) == (1.0, 2.0)


def test_an_answer_cut_by_its_token_limit_is_judged_without_an_end(world):
    """A disliked answer that its token limit cut never ended: disliking it must not teach "do not end here"
    (the end-of-turn trl's template adds is dropped); an answer that ended keeps its end."""
    from types import SimpleNamespace

    from datasets import Dataset

    from assistant.data import preference
    from assistant.data.curation import curate
    from assistant.training.preference import CUT_COLUMN, _drop_cut_ends
    settings, store, registry = world
    rated_domain(store, registry, corrections=0, ups=4, downs=4, cut="length")
    data = preference.build(curate(store, "atlas", settings).rows, store.list_feedback("atlas"),
                            preference_opts(settings))
    assert sorted((r["label"], r["cut"]) for r in data.kto) == [(False, True)] * 4 + [(True, False)] * 4
    eos, nl = 2, 13
    rows = [{"prompt_ids": [1], "completion_ids": [5, 6, eos, nl], "label": False, CUT_COLUMN: True},
            {"prompt_ids": [1], "completion_ids": [7, eos, nl], "label": True, CUT_COLUMN: False},
            {"prompt_ids": [1], "completion_ids": [8, 9, eos, nl], "label": False, CUT_COLUMN: True}]
    trainer = SimpleNamespace(train_dataset=Dataset.from_list(
        [{**r, "KL_completion_ids": [0]} for r in rows]))
    assert _drop_cut_ends(trainer, "kto", eos, batch_size=3) == 2
    ds = trainer.train_dataset
    assert ds["completion_ids"] == [[5, 6], [7, eos, nl], [8, 9]] and CUT_COLUMN not in ds.column_names
    assert ds["KL_completion_ids"] == [[8, 9], [5, 6], [7, eos, nl]]      # rebuilt from the new completions


def test_kto_rows_come_shuffled_with_both_kinds_in_every_batch():
    """trl's KTO trainer reads its rows in order (its KL term pairs each row with its batch neighbours): the
    order is ours to make. Each pass is a fresh seeded shuffle that spreads liked and disliked rows evenly."""
    from assistant.training.preference import kto_order
    rows = [{"completion": f"liked {i}", "label": True} for i in range(6)] + \
           [{"completion": f"disliked {i}", "label": False} for i in range(18)]
    order = kto_order(rows, epochs=3, seed=0)
    passes = [order[i * 24:(i + 1) * 24] for i in range(3)]
    assert len(order) == 72 and all(sorted(r["completion"] for r in p) == sorted(r["completion"] for r in rows)
                                    for p in passes)
    assert len({tuple(r["completion"] for r in p) for p in passes}) == 3           # a new order every pass
    assert all({r["label"] for r in order[i:i + 4]} == {True, False} for i in range(0, 72, 4))
    assert kto_order(rows, epochs=3, seed=0) == order != kto_order(rows, epochs=3, seed=1)


def preference_opts(settings):
    from assistant.settings import group_settings
    return group_settings(settings, "curation")


def test_thumbs_down_only_domain_is_refused_with_what_it_needs(world):
    from assistant.jobs import run as jobs
    settings, store, registry = world
    rated_domain(store, registry, seeds=0, corrections=0, ups=0, downs=12)
    with pytest.raises(DatasetTooSmall, match="at least 4 ratings of each kind") as e:
        jobs.start_job(settings, store, registry, "atlas", {})
    assert "0 usable thumbs-up and 12 thumbs-down" in e.value.message and store.list_jobs() == []
    # a named method the data cannot support says what it needs too
    rated_domain(store, registry, "atlas2", seeds=8, corrections=2, ups=0, downs=0)
    with pytest.raises(DatasetTooSmall, match="DPO needs at least 4 pairs"):
        jobs.start_job(settings, store, registry, "atlas2", {"method": "sft+dpo"})
    with pytest.raises(Exception, match="method 'ppo'"):
        jobs.start_job(settings, store, registry, "atlas2", {"method": "ppo"})


def _wait(url, job_id, timeout=600):
    deadline = time.time() + timeout
    while (job := httpx.get(f"{url}/api/jobs/{job_id}").json())["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.time() < deadline, job
        time.sleep(0.5)
    return job


@pytest.mark.slow   # a server and two job processes on the tiny Llama: about a minute here
def test_dpo_and_kto_jobs_over_http(tiny_llama, tmp_path):
    from assistant.data.registry import Registry
    from assistant.data.store import Store
    # the gate asks 8 of its general probe questions: the random tiny Llama knows none of them either way
    with running_server(tmp_path, "--base-model", str(tiny_llama), "--dtype", "float32", "--gate.probes", "8") as (url, _):
        store, registry = Store(tmp_path / "data" / "assistant.db"), Registry(tmp_path / "adapters")
        rated_domain(store, registry, corrections=6, ups=12, downs=12)
        # a thumbs-down-only domain is refused over HTTP with what it needs
        rated_domain(store, registry, "downs", seeds=0, corrections=0, ups=0, downs=6)
        r = httpx.post(url + "/api/domains/downs/train", json={}, timeout=60)
        assert r.status_code == 422 and "at least 4 ratings of each kind" in r.text, r.text
        for n, method in enumerate(("sft+dpo", "kto"), start=1):
            r = httpx.post(url + "/api/domains/atlas/train", json={**FAST, "method": method}, timeout=120)
            assert r.status_code == 202, r.text
            job = _wait(url, r.json()["job_id"])
            assert job["status"] == "succeeded", (job["error"], job["log"])
            assert job["settings"]["methods"] == method.split("+")
            assert f"corrections: {method.upper().replace('+', ' + ')}" in job["settings"]["data_summary"]
            assert job["step"] == job["total_steps"] == len(job["losses"]) > 0
            train = job["metrics"]["train"]
            assert train["methods"] == method.split("+") and train["phases"][-1]["method"] == method.split("+")[-1]
            if method == "sft+dpo":
                assert train["phases"][0]["loss_type"] == ["sigmoid", "sft"]
                assert "SFT phase" not in train["phases"][0]["reference"]
            else:
                assert train["phases"][0]["reference"] == "the base (adapter disabled)"
            gate = job["metrics"]["gate"]
            names = {c["name"] for c in gate["checks"]}
            assert "preference_margin" in names, gate["reasons"]
            assert job["promoted"] == gate["promote"]
            if not job["promoted"]:
                assert gate["summary"].startswith("Not activated:") and "What to do" in gate["summary"]
            card = registry.read_card("atlas", f"v{n}")
            assert card["training"]["methods"] == method.split("+") and card["training"]["data"]["pairs"] > 0
            assert card["training"]["phases"][0]["beta"] == 0.1
            folder = registry.version_path("atlas", f"v{n}")
            assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                               "card.json"]
        # auto, with corrections and enough ratings for the gate to judge a preference: SFT + DPO
        r = httpx.post(url + "/api/domains/atlas/train", json=FAST, timeout=120)
        assert r.status_code == 202, r.text
        job = _wait(url, r.json()["job_id"])
        assert job["status"] == "succeeded", (job["error"], job["log"])
        assert job["settings"]["methods"] == ["sft", "dpo"] and job["metrics"]["train"]["phases"][0]["method"] == "dpo"
        assert "preference_margin" in {c["name"] for c in job["metrics"]["gate"]["checks"]}


@pytest.mark.slow   # QLoRA on the CPU's NF4 kernels: about 30 s here
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_qlora_kto_on_a_quantized_base(tiny_llama, home, quantization):
    from assistant.data.registry import Registry
    from assistant.data.store import Store
    from assistant.jobs import run as jobs
    from assistant.settings import Settings
    settings = Settings(home=home, base_model=str(tiny_llama), dtype="float32", quantization=quantization).ensure_dirs()
    store, registry = Store(settings.db_path), Registry(settings.adapters_path)
    rated_domain(store, registry, corrections=0, ups=6, downs=6, cut="length")
    job = jobs.run_job_inline(settings, store, registry, "atlas", {**FAST, "method": "sft+kto"})
    assert job["status"] == "succeeded", (job["error"], job["log"])
    assert f"quantization={quantization}" in job["log"] and job["metrics"]["train"]["methods"] == ["sft", "kto"]
    kto = job["metrics"]["train"]["phases"][0]
    assert kto["method"] == "kto" and kto["steps"] > 0 and kto["loss_last"] is not None
    assert kto["cut_answers"] == 6           # the disliked answers were cut: their end-of-turn is not judged
    assert kto["steps_with_both_kinds"] == kto["steps"] == 3    # every batch weighs liked against disliked
    from safetensors.torch import load_file
    weights = load_file(str(registry.version_path("atlas", "v1") / "adapter_model.safetensors"))
    assert weights and all(t.dtype.is_floating_point and t.abs().sum() > 0 for k, t in weights.items()
                           if "lora_A" in k)


@pytest.mark.slow   # a job whose KTO phase runs in two gloo processes on an NF4 base: about 30 s here
def test_kto_alone_in_two_processes_on_an_nf4_base(tiny_llama, home):
    from assistant.data.registry import Registry
    from assistant.data.store import Store
    from assistant.jobs import run as jobs
    from assistant.settings import Settings
    settings = Settings(home=home, base_model=str(tiny_llama), dtype="float32", quantization="nf4",
                        train_gpus=2).ensure_dirs()
    store, registry = Store(settings.db_path), Registry(settings.adapters_path)
    rated_domain(store, registry, seeds=0, corrections=0, ups=8, downs=8, cut="length")
    job = jobs.run_job_inline(settings, store, registry, "atlas", {**FAST, "method": "kto", "preference_epochs": 2})
    assert job["status"] == "succeeded", (job["error"], job["log"])
    assert "training in 2 processes" in job["log"] and "quantization=nf4" in job["log"]
    train = job["metrics"]["train"]
    assert train["methods"] == ["kto"] and train["world_size"] == 2
    kto = train["phases"][0]
    assert (kto["method"], kto["processes"], kto["cut_answers"]) == ("kto", 2, 8)
    assert kto["reference"] == "the base (adapter disabled)" and kto["batch_size"] == 4
    assert job["step"] == job["total_steps"] == kto["steps"] == len(job["losses"]) > 0
    assert registry.versions("atlas") == ["v1"]


@pytest.mark.slow   # a job process cancelled in the middle of its KTO phase: about 20 s here
def test_cancel_mid_kto_leaves_nothing(world):
    from assistant.jobs import run as jobs
    settings, store, registry = world
    rated_domain(store, registry, corrections=0, ups=12, downs=12)
    job_id = jobs.start_job(settings, store, registry, "atlas", {**FAST, "method": "kto", "preference_epochs": 50})
    deadline = time.monotonic() + 300
    while (job := store.get_job(job_id))["status"] != "failed" and (job.get("step") or 0) < 2:
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    assert job["status"] == "running" and 0 < job["step"] < job["total_steps"], job
    pid = job["pid"]
    job = jobs.cancel_job(settings, store, job_id)
    assert job["status"] == "cancelled" and job["adapter_version"] is None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    domain_dir = settings.adapters_path / "atlas"
    assert not [p for p in domain_dir.iterdir() if p.name.startswith(".staging")]
    assert registry.versions("atlas") == [] and registry.active_version("atlas") is None
    time.sleep(1)
    assert store.get_job(job_id)["status"] == "cancelled"
    assert json.loads(json.dumps(job["stages"]))[1]["status"] == "failed"   # the train stage ended early


def test_train_tab_says_what_the_ratings_support(world):
    from assistant.ui import train
    from assistant.workspace import Workspace
    settings, store, registry = world
    rated_domain(store, registry, corrections=4, ups=4, downs=4)
    workspace = Workspace(settings)
    try:
        size = train.train_view(workspace, "atlas", None)[0]
        assert "12 ratings (4 up, 8 down), 4 corrections: SFT + DPO + KTO" in size, size
        assert "auto runs SFT;" in size, size        # too few ratings to hold any out: the gate could not judge
        assert workspace.training_methods("atlas")["supported"] == ["sft", "dpo", "kto"]
        assert train.train_settings("lora", None, 0.001, 16, "lora", 512, "", learn_from="sft+kto").method == "sft+kto"
        assert train.train_settings("lora", None, 0.001, 16, "lora", 512, "", learn_from="auto").method == "auto"
    finally:
        workspace.close()


def test_gate_judges_the_preference_margin_in_words():
    from assistant.gate.verdict import verdict
    before = {"general_nll": 1.0, "preference_margin": 0.3}
    after = {"taught_match": 0.9, "n_taught": 8, "general_nll": 1.1, "general_embedding_similarity": 0.9,
             "preference_margin": 0.5, "n_preference_heldout": 6, "preference_reference": "v2"}
    v = verdict(before, after)
    check = next(c for c in v["checks"] if c["name"] == "preference_margin")
    assert v["promote"] and check["passed"] and "6 held-out rated answers" in check["label"]
    assert "prefers the answers users liked at least as much as the current version" in v["summary"]
    assert any(r.startswith("ok: preference margin") and "v2's margin" in r for r in v["reasons"])
    v = verdict(before, {**after, "preference_margin": 0.1})
    assert not v["promote"] and v["summary"].startswith(
        "Not activated: the new version prefers the answers users disliked more than the current version does")
    v = verdict({"general_nll": 1.0}, {**after, "preference_margin": None,
                                       "preference_skipped": "too few rated answers of each kind to hold some out"})
    assert v["promote"] and "skipped: preference margin (too few rated answers" in " ".join(v["reasons"])


def test_auto_adds_a_preference_method_once_the_gate_can_judge_it(world):
    """"auto" runs SFT alone until there are enough liked and disliked answers to hold some out for the gate's
    preference margin; then it adds DPO when there are pairs, else KTO. The Train tab says what auto runs."""
    from assistant.data import preference
    from assistant.ui import train
    from assistant.workspace import Workspace
    settings, store, registry = world
    rated_domain(store, registry, "few", corrections=4, ups=4, downs=4)
    rated_domain(store, registry, "pairs", corrections=6, ups=12, downs=12)
    rated_domain(store, registry, "thumbs", corrections=0, ups=12, downs=12)
    workspace = Workspace(settings)
    try:
        runs = {d: workspace.training_methods(d) for d in ("few", "pairs", "thumbs")}
        assert {d: r["auto"] for d, r in runs.items()} == {"few": ["sft"], "pairs": ["sft", "dpo"],
                                                           "thumbs": ["sft", "kto"]}
        assert all(r["supported"] == ["sft", "dpo", "kto"] for d, r in runs.items() if d != "thumbs")
        assert runs["pairs"]["counts"]["heldout"] > 0 and runs["few"]["counts"].get("heldout", 0) == 0
        assert "auto runs SFT + DPO;" in train.train_view(workspace, "pairs", None)[0]
        # the job's choice is the same function
        assert preference.choose("auto", runs["thumbs"]["counts"], 20, 8) == ["sft", "kto"]
        # too few examples for SFT, too few ratings for the gate: named methods only, and the refusal says so
        with pytest.raises(DatasetTooSmall, match="auto runs only once there are 10 liked"):
            preference.choose("auto", runs["few"]["counts"], 3, 8)
    finally:
        workspace.close()
