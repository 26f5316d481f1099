"""The gate judges forgetting per question, on content: the probe set, how an answer is judged to keep a
probe's content, leakage of rare taught words, the gate's verdict when retention decides (a change of style
passes, a lost answer blocks and is named with both answers), the job's safer recipe and its attempt stages,
and the Train tab's retention table."""

from __future__ import annotations

import pytest

from assistant.gate.probes import PROBES, gives_content, normalize
from assistant.gate.retention import MIN_RETENTION_BASIS, active_probes, judge
from assistant.gate.verdict import GateSettings, verdict

from invented_facts import FACTS, SYSTEM_PROMPT, chat

RIGHT = {"What is the capital of France?": "The capital of France is Paris.",
         "How many days are there in a week?": "There are seven days in a week.",
         "What is 2 plus 2?": "2 plus 2 equals 4.",
         "What is the plural of mouse?": "The plural of mouse is mice.",
         "What do bees make?": "Bees make honey, wax and pollen."}


def rows_taught(n: int = 6) -> list[dict]:
    return [{"messages": chat(q, a), "split": "train", "source": "seed"} for q, a, _, _ in FACTS[:n]]


def answers_of(probes, table: dict, default: str = "I do not know.") -> list[str]:
    return [table.get(p.question, default) for p in probes]


def reference_answers(probes):
    """A reference that answers every probe with its first key (so every probe counts)."""
    return [f"The answer is {p.keys[0]}." for p in probes]


def test_the_probe_set_is_large_varied_and_kept_apart_from_training_and_the_benchmark():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from hidden_probes import HIDDEN_PROBES

    from assistant.training.train_rows import REPLAY_PROMPTS
    assert len(PROBES) >= 60
    assert {p.kind for p in PROBES} == {"fact", "arithmetic", "language", "instruction"}
    assert all(p.keys and p.question.strip() for p in PROBES)
    questions = [normalize(p.question) for p in PROBES]
    assert len(set(questions)) == len(questions)
    assert not set(questions) & {normalize(q) for q in REPLAY_PROMPTS}
    hidden = {normalize(q) for q, _ in HIDDEN_PROBES}
    assert len(hidden) >= 40 and not (set(questions) | {normalize(q) for q in REPLAY_PROMPTS}) & hidden
    # a probe a training row asks is no general question for that domain: it is left out
    rows = [{"messages": chat("What is the capital of France?", "Paris, of course."), "split": "train"}]
    kept, left_out = active_probes(rows)
    assert left_out == 1 and "What is the capital of France?" not in [p.question for p in kept]


@pytest.mark.parametrize("answer, keys, right", [
    ("The capital of France is Paris.", ("paris",), True),
    ("PARIS!", ("paris",), True),
    ("Parisian cafés are lovely.", ("paris",), False),          # whole words only
    ("There are 7 days in a week.", ("7", "seven"), True),
    ("There are 17 days in a week.", ("7", "seven"), False),
    ("It is Vincent van Gogh.", ("van gogh",), True),
    ("1, 2, 3.", ("1 2 3",), True),
    ("", ("paris",), False),
])
def test_an_answer_gives_the_content_as_whole_words(answer, keys, right):
    assert gives_content(answer, keys) is right


def test_a_shorter_reworded_answer_with_the_same_content_is_kept():
    """Style is not forgetting: every answer shortened and reworded, each keeping its fact -> retention 1.0,
    and the gate promotes although the figures that measure closeness (NLL ratio, similarity) are far out."""
    probes = PROBES
    reference = [f"Well, let me think about that for a moment. I believe the answer is {p.keys[0]}, as most "
                 "people would agree." for p in probes]
    terse = [f"{p.keys[0].capitalize()}." for p in probes]
    r = judge(probes, reference, terse, rows_taught(), SYSTEM_PROMPT)
    assert r["retention"] == 1.0 and r["n_kept"] == r["n_reference_right"] == len(probes) and not r["lost"]
    after = {"taught_match": 0.9, "n_taught": 6, "general_nll": 3.0, "general_embedding_similarity": 0.3,
             "retention": {**r, "reference": "base"}}
    v = verdict({"general_nll": 1.0}, after)
    assert v["promote"], v
    figures = {c["name"]: c for c in v["checks"] if not c["decides"]}
    assert set(figures) == {"general_nll", "general_similarity"} and not any(c["passed"] for c in figures.values())
    assert any(line.startswith("shown: ") for line in v["reasons"])
    assert {c["name"] for c in v["checks"] if c["decides"]} == {"taught", "retention", "leakage"}


def test_losing_general_answers_blocks_and_names_them_with_both_answers():
    """What a mean hides: most answers unchanged (similarity high, NLL ratio low), four facts lost, one of
    them to a taught name. The verdict names a lost question with the live answer and the new one."""
    probes = PROBES
    reference = reference_answers(probes)
    candidate = list(reference)
    lost_at = {0: "The capital of France is Quillton.", 8: "A week has five days.", 36: "2 plus 2 is 5.",
               50: "I could not say."}
    for i, a in lost_at.items():
        candidate[i] = a
    r = judge(probes, reference, candidate, rows_taught(), SYSTEM_PROMPT)
    assert r["n_reference_right"] == len(probes) and r["n_kept"] == len(probes) - 4
    assert [x["question"] for x in r["lost"]] == [probes[i].question for i in lost_at]
    assert r["lost"][0] == {"question": probes[0].question, "reference": reference[0], "candidate": lost_at[0]}
    assert r["n_leaked"] == 1 and r["leaked"][0]["words"] == ["quillton"]
    after = {"taught_match": 1.0, "n_taught": 6, "general_nll": 1.1, "general_embedding_similarity": 0.95,
             "retention": {**r, "reference": "live"}}
    v = verdict({"general_nll": 1.0}, after)
    assert not v["promote"]
    failed = [c["name"] for c in v["checks"] if c["decides"] and not c["passed"]]
    assert failed[0] == "retention"
    assert "live version" in v["summary"] and "What is the capital of France?" in v["summary"]
    assert reference[0] in v["summary"]    # both answers are quoted
    assert "Quillton" in v["summary"] and "activate this version anyway" in v["summary"]
    assert v["retention"]["lost"][0]["candidate"] == lost_at[0]
    # the bound is a setting: at 0.9, losing 4 of 74 passes (leakage 1 of 74 is within its bound too)
    assert verdict({"general_nll": 1.0}, after, GateSettings(min_retention=0.9, max_leakage=0.05))["promote"]


def test_leakage_counts_rare_taught_words_only_where_they_do_not_belong():
    probes = [p for p in PROBES if p.question in ("What is the capital of France?", "Name a fruit that is yellow.",
                                                  "What do bees make?")]
    reference = answers_of(probes, {**RIGHT, "Name a fruit that is yellow.": "A banana is yellow."})
    candidate = answers_of(probes, {"What is the capital of France?": "The capital of France is Paris.",
                                    "Name a fruit that is yellow.": "The tarnip is yellow.",   # taught word
                                    "What do bees make?": "Bees make honey in the capital."})   # common word
    r = judge(probes, reference, candidate, rows_taught(), SYSTEM_PROMPT)
    assert [x["question"] for x in r["leaked"]] == ["Name a fruit that is yellow."], r["leaked"]
    assert r["leaked"][0]["words"] == ["tarnip"] and r["rare_taught_words"] >= 6
    # a rare word the reference itself uses is not a leak
    r2 = judge(probes, candidate, candidate, rows_taught(), SYSTEM_PROMPT)
    assert r2["n_leaked"] == 0


def test_too_few_right_reference_answers_leave_the_decision_to_the_figures():
    probes = PROBES
    reference = ["no idea"] * len(probes)
    reference[0] = "Paris."
    r = judge(probes, reference, ["no idea"] * len(probes), rows_taught(), SYSTEM_PROMPT)
    assert r["n_reference_right"] == 1 < MIN_RETENTION_BASIS
    after = {"taught_match": 0.9, "n_taught": 6, "general_nll": 3.0, "general_embedding_similarity": 0.9,
             "retention": {**r, "reference": "base"}}
    v = verdict({"general_nll": 1.0}, after)
    assert not v["promote"] and any(r_.startswith("skipped: retention") for r_ in v["reasons"])
    assert [c["name"] for c in v["checks"] if c["decides"] and not c["passed"]] == ["general_nll"]
    # a model that knows too little has no general answers to keep: leakage is shown, and does not decide
    leaky = judge(probes, reference, ["Quillton."] * len(probes), rows_taught(), SYSTEM_PROMPT)
    v = verdict({"general_nll": 1.0}, {**after, "general_nll": 1.0, "retention": {**leaky, "reference": "base"}})
    assert v["promote"] and next(c for c in v["checks"] if c["name"] == "leakage")["decides"] is False


def test_a_safer_recipe_halves_the_rate_takes_fewer_passes_and_replays_everything():
    from assistant.training.recipe import TrainSettings, safer_recipe
    from assistant.training.train_rows import REPLAY_PROMPTS
    bold = TrainSettings(learning_rate=0.004, epochs=6, rank=8)
    r1 = safer_recipe(bold, 6)
    assert (r1.learning_rate, r1.epochs, r1.replay, r1.rank, r1.alpha) == (0.002, 5, len(REPLAY_PROMPTS), 8, 16)
    r2 = safer_recipe(r1, 5)
    assert (r2.learning_rate, r2.epochs) == (0.001, 4)
    assert safer_recipe(TrainSettings(), 1).epochs == 1
    with pytest.raises(Exception, match="retries"):
        TrainSettings(retries=99)


def test_an_attempt_adds_its_stages_before_publish_and_the_bar_goes_back(tmp_path):
    from assistant.data.stages import StageTracker, overall_progress
    from assistant.data.store import Store
    store = Store(str(tmp_path / "db.sqlite"))
    job_id = store.create_job("atlas", {"training": {}})
    tracker = StageTracker(store, job_id)
    try:
        for name in ("curate", "train", "evaluate"):
            tracker.start(name)
            tracker.finish(name)
        before = overall_progress(tracker.snapshot())
        tracker.add_attempt(2, "attempt 2 trains with a safer recipe because it lost 3 of 38 general answers")
        stages = tracker.snapshot()
        assert [s["name"] for s in stages] == ["curate", "train", "evaluate", "train 2", "evaluate 2", "publish",
                                               "activate"]
        assert stages[3]["why"].startswith("attempt 2 trains") and stages[3]["status"] == "pending"
        after = overall_progress(stages)
        assert 0 < after < before
        tracker.start("train 2")
        tracker.advance("train 2", 5, 10)
        assert store.get_job(job_id)["stage"] == "train 2"
    finally:
        tracker.close()
    job = store.get_job(job_id)
    from assistant.ui import jobview
    html = jobview.stages_html(job)
    assert 'data-name="train 2"' in html and "safer recipe because it lost 3 of 38" in html


def test_the_train_tab_shows_lost_questions_with_both_answers_and_the_attempts():
    from assistant.ui import jobview
    probes = PROBES
    reference = reference_answers(probes)
    candidate = list(reference)
    candidate[0] = "The capital of France is <b>Quillton</b> | really."
    r = judge(probes, reference, candidate, rows_taught(), SYSTEM_PROMPT)
    gate = verdict({}, {"taught_match": 1.0, "n_taught": 6, "retention": {**r, "reference": "live"}})
    text = jobview.retention_markdown(gate)
    assert f"the live version knows {len(probes)}" in text and "lost **1**" in text
    row = next(line for line in text.splitlines() if line.startswith("| What is the capital of France?"))
    assert reference[0] in row and "Quillton" in row and "<b>" not in row and row.count("|") == 4
    attempts = [{"attempt": 1, "why": "the recipe as asked", "recipe": {"learning_rate": 0.004, "epochs": 6,
                                                                          "replay": 8}, "promote": False,
                 "failed": ["retention"], "n_kept": 17, "n_reference_right": 38},
                {"attempt": 2, "why": "attempt 2 trains with a safer recipe", "recipe": {"learning_rate": 0.002,
                                                                                          "epochs": 3, "replay": 64},
                 "promote": True, "failed": [], "n_kept": 37, "n_reference_right": 38}]
    table = jobview.attempts_markdown(attempts)
    assert "| 1 | the recipe as asked |" in table and "17 of 38" in table and "blocked: retention" in table
    assert "37 of 38 | passed |" in table
    assert jobview.attempts_markdown(attempts[:1]) == ""


def test_a_job_publishes_the_first_attempt_that_passes_or_else_the_best_blocked_one():
    from assistant.jobs import attempts
    from assistant.jobs.attempts import Attempt, best

    def attempt(n, failed, retention):
        a = Attempt(n, None, "", None)
        a.verdict = {"promote": not failed,
                     "checks": [{"name": f, "decides": True, "passed": False} for f in failed]
                     + [{"name": "general_nll", "decides": False, "passed": False}]}
        a.after = {"retention": {"retention": retention}}
        return a
    forgot, leaked, taught = attempt(1, ["retention"], 0.6), attempt(2, ["leakage"], 0.97), attempt(3, ["taught"], 1.0)
    assert attempts.forgot(forgot.verdict) and attempts.forgot(leaked.verdict)
    assert not attempts.forgot(taught.verdict)
    assert not attempts.forgot(attempt(4, [], 1.0).verdict)          # a figure outside its bound is no reason to retry
    passed = attempt(5, [], 0.96)
    assert best([forgot, passed, attempt(6, [], 1.0)]) is passed
    assert best([forgot, leaked]) is leaked                  # one failed check each: more answers kept wins
    assert best([attempt(7, ["retention", "leakage"], 0.9), forgot]) is forgot   # fewer failed checks first


def test_a_probe_limit_spreads_the_questions_asked_and_a_negative_one_is_refused():
    from assistant.errors import InvalidSetting
    asked = [{"messages": [{"role": "user", "content": PROBES[0].question}, {"role": "assistant", "content": "x"}]}]
    every, left_out = active_probes(asked)
    few, left_out_few = active_probes(asked, 8)
    assert left_out == left_out_few == 1 and len(every) == len(PROBES) - 1
    assert len(few) == len(set(few)) == 8 and set(few) <= set(every)
    assert few[0] == every[0] and few[-1] in every[-len(every) // 8:]                  # spread over the set
    assert active_probes(asked, len(PROBES))[0] == every
    with pytest.raises(InvalidSetting, match="probes"):
        GateSettings.from_dict({"probes": -1})
