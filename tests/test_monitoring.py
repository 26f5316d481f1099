"""Monitoring through a live server: answers served, ratings, latency, and drift of the questions away from
the training snapshot and back, with the retrain recommendation following it; JSON and Prometheus."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import running_server

pytestmark = pytest.mark.slow
REFRESH_WAIT_S = 60   # the drift gauges are refreshed in the background: REFRESH_MIN_GAP_S after the last round

# The domain's training data: home-router support questions.
TRAIN = [
    ("How do I reset my Acme router to factory settings?", "Hold the reset button for 10 seconds."),
    ("How can I change the Wi-Fi password on my router?", "Open 192.168.1.1, Wireless, Security."),
    ("Why is my internet connection slow in the evening?", "Peak hours: try the 5 GHz band."),
    ("How do I update the router firmware?", "Settings, System, Firmware update."),
    ("What does a blinking red light on the router mean?", "No signal from the line: check the cable."),
    ("How do I set up a guest Wi-Fi network?", "Wireless, Guest network, enable."),
    ("How can I see which devices are connected to my Wi-Fi?", "Open the Devices page of the router."),
    ("How do I forward a port on the router for gaming?", "Advanced, NAT, Port forwarding."),
    ("My router keeps dropping the connection, what should I do?", "Move it away from walls and restart it."),
    ("How do I enable parental controls on the router?", "Security, Parental controls."),
    ("How do I change the name of my Wi-Fi network?", "Wireless, SSID."),
    ("Can I extend my Wi-Fi coverage with a mesh node?", "Yes, pair an Acme mesh node with WPS."),
]
# Asked later: the same kind of questions, worded differently.
IN_DIST = [
    "How do I factory reset the router?", "I forgot my Wi-Fi password, how do I change it?",
    "The internet is very slow at night, why?", "Is there a firmware update for my router and how do I install it?",
    "The light on my router is blinking red, what is wrong?", "Can I create a separate Wi-Fi network for guests?",
    "How do I see the devices on my network?", "How do I open a port on my router for a game console?",
    "My Wi-Fi connection keeps dropping every few minutes.", "How do I block websites for my kids on the router?",
    "How do I rename my wireless network?", "How can I get better Wi-Fi coverage upstairs?",
]
UNRELATED = [
    "What is a good recipe for banana bread?", "Who painted the Mona Lisa?", "How far is the Moon from Earth?",
    "What is the capital of Australia?", "How do I cook rice in a pot?", "Who wrote Pride and Prejudice?",
    "What causes the seasons on Earth?", "How many players are on a football team?",
    "What is photosynthesis?", "When did the Roman Empire fall?", "How do I knit a scarf?",
    "What is the tallest mountain in Africa?",
]


def _ask(client, questions):
    ids = []
    for q in questions:
        r = client.post("/v1/chat/completions", json={"model": "support", "max_tokens": 2, "temperature": 0,
                                                      "messages": [{"role": "user", "content": q}]})
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
    return ids


def _prometheus(client) -> dict:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(r.text) for s in f.samples}


def _drift(client):
    r = client.get("/api/domains/support/metrics")
    assert r.status_code == 200, r.text
    return r.json()


def test_drift_and_recommendation_follow_the_questions(home, tiny_llama):
    with running_server(home, "--base-model", str(tiny_llama), "--dtype", "float32") as (url, _):
        c = httpx.Client(base_url=url, timeout=60)
        assert c.post("/api/domains", json={"name": "support", "system_prompt": "Acme support."}).status_code == 201
        ex = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in TRAIN]
        assert c.post("/api/domains/support/examples", json={"examples": ex}).json()["added"] == len(TRAIN)
        assert c.get("/api/domains/support/dataset").json()["kept"] == len(TRAIN)   # curate: the reference

        # 1. Questions like the training data: low drift, no recommendation.
        _ask(c, IN_DIST)
        m = _drift(c)
        assert m["answers"] == len(IN_DIST)
        assert m["drift"]["reference_questions"] == len(TRAIN)
        cur = m["drift"]["current"]
        assert cur["questions"] == len(IN_DIST)
        assert cur["ood_rate"] <= 0.2 and cur["centroid_shift"] < 0.2, cur
        assert not m["recommendation"]["retrain"], m["recommendation"]
        calm = cur

        # 2. Unrelated questions take over the window: drift up, retrain recommended, reason given.
        _ask(c, UNRELATED + UNRELATED[:8])
        m = _drift(c)
        cur = m["drift"]["current"]
        assert cur["questions"] == m["settings"]["window_questions"]
        assert cur["ood_rate"] >= 0.9 and cur["centroid_shift"] > calm["centroid_shift"] + 0.2, cur
        rec = m["recommendation"]
        assert rec["retrain"] and "unlike the training data" in rec["reason"], rec
        assert m["drift"]["timeline"] and m["drift"]["timeline"][-1]["ood_rate"] > calm["ood_rate"]

        # 3. Back to the domain's own questions: drift falls and the recommendation clears.
        _ask(c, IN_DIST + IN_DIST[:8])
        m = _drift(c)
        cur = m["drift"]["current"]
        assert cur["ood_rate"] <= 0.2 and cur["centroid_shift"] < 0.2, cur
        assert not m["recommendation"]["retrain"], m["recommendation"]

        # 4. Bad answers: thumbs down and corrections on the latest answers -> recommended, for that reason.
        ids = _ask(c, IN_DIST[:6])
        for i, rid in enumerate(ids):
            body = {"response_id": rid, "rating": "down", "correction": "Hold reset for 10 s." if i % 2 else None}
            assert c.post("/api/feedback", json=body).status_code == 201
        m = _drift(c)
        assert m["quality"]["rated"] == 6 and m["quality"]["bad_rate"] == 1.0
        assert m["recommendation"]["retrain"] and "thumbs down or corrected" in m["recommendation"]["reason"]
        v = {x["adapter_version"]: x for x in m["versions"]}["base"]
        total = len(IN_DIST) * 2 + 8 + len(UNRELATED) + 8 + 6
        assert v["answers"] == total and v["down"] == 6 and v["corrections"] == 3
        assert v["down_rate"] == pytest.approx(6 / total, abs=1e-3)
        assert v["latency_ms"]["p50"] <= v["latency_ms"]["p90"] <= v["latency_ms"]["p99"]
        assert sum(b["answers"] for b in m["timeline"]) == total
        final = m["drift"]["current"]

        # Prometheus text on the same port: the counters at once; the gauges once the background refresh ran.
        support = (("domain", "support"),)
        deadline = time.monotonic() + REFRESH_WAIT_S
        while (p := _prometheus(c)).get(("assistant_retrain_recommended", support)) != 1:
            assert time.monotonic() < deadline, p
            time.sleep(0.5)
        base = (*support, ("version", "base"))
        assert p[("assistant_answers_total", base)] == total
        assert p[("assistant_feedback_total", (*support, ("rating", "down"), ("version", "base")))] == 6
        assert p[("assistant_corrections_total", base)] == 3
        assert p[("assistant_latency_seconds_count", base)] == total
        assert p[("assistant_latency_seconds_bucket", (*support, ("le", "+Inf"), ("version", "base")))] == total
        assert p[("assistant_bad_answer_rate", support)] == 1.0
        assert p[("assistant_drift_ood_rate", support)] == pytest.approx(final["ood_rate"])

        # Names are checked before anything else.
        assert c.get("/api/domains/..%2Fetc/metrics").status_code in (404, 422)
        assert c.get("/api/domains/nope/metrics").status_code == 404
