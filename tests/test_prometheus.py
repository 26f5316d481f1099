"""GET /metrics through prometheus_client, on a real store, registry and MiniLM: counters only go up, histogram
buckets are cumulative, each app has its own registry, and a scrape never embeds a question (the drift
gauges come from the refresh, in the background)."""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

from assistant.data.curation import curate, default_embedder
from assistant.monitoring.report import Exporter, close_exporter, exporter_for, prometheus_text
from assistant.settings import Settings

TRAIN = [("How do I reset my Acme router?", "Hold the reset button for 10 seconds."),
         ("How can I change the Wi-Fi password?", "Open 192.168.1.1, Wireless, Security."),
         ("Why is my internet slow in the evening?", "Peak hours: try the 5 GHz band."),
         ("How do I update the router firmware?", "Settings, System, Firmware update."),
         ("What does a blinking red light mean?", "No signal from the line: check the cable."),
         ("How do I set up a guest Wi-Fi network?", "Wireless, Guest network, enable.")]
ASKED = ["How do I factory reset the router?", "I forgot my Wi-Fi password, how do I change it?",
         "The internet is very slow at night, why?", "Is there a firmware update for my router?",
         "The light on my router is blinking red.", "Can I make a Wi-Fi network for guests?"]
UNSEEN = [f"Question never embedded before number {i}: what is the tallest tree in forest {i * 7}?" for i in range(6)]


def App(home):
    """The app's Workspace: what monitoring reads (store, registry, settings, log failures)."""
    from assistant.workspace import Workspace
    return Workspace(Settings(home=home))


def _ask(app, questions, start, latency_ms=(40.0, 800.0, 4000.0)):
    for i, q in enumerate(questions):
        app.store.log_response(id=f"r{start + i}", domain="support", adapter_version=None, model="support",
                               messages=[{"role": "user", "content": q}], answer="ok", prompt_tokens=5,
                               completion_tokens=2, latency_ms=latency_ms[i % len(latency_ms)],
                               ttft_ms=None if i == 0 else 20.0 * i, finish_reason="stop")


def _parse(text) -> dict:
    """-> {metric name: (type, {(sample name, sorted labels): value})}"""
    return {f.name: (f.type, {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples})
            for f in text_string_to_metric_families(text)}


def _check_histograms(parsed):
    for name, (kind, samples) in parsed.items():
        if kind != "histogram":
            continue
        series: dict[tuple, list] = {}
        for (sample, labels), value in samples.items():
            if sample.endswith("_bucket"):
                le = dict(labels)["le"]
                series.setdefault(tuple(kv for kv in labels if kv[0] != "le"), []).append(
                    (float("inf") if le == "+Inf" else float(le), value))
        assert series, name
        for labels, buckets in series.items():
            counts = [v for _, v in sorted(buckets)]
            assert counts == sorted(counts), (name, labels, counts)                      # cumulative
            assert counts[-1] == samples[(f"{name}_count", labels)], (name, labels)    # +Inf is the count


def _check_counters_grew(old, new):
    for name, (kind, samples) in old.items():
        if kind == "counter":
            for key, value in samples.items():
                assert new[name][1][key] >= value, (name, key, value, new[name][1][key])


def _value(parsed, name, **labels):
    kind, samples = parsed[name]
    sample = name + ("_total" if kind == "counter" else "")
    return samples.get((sample, tuple(sorted(labels.items()))))


def test_scrapes_count_up_read_cached_drift_and_never_embed(tmp_path):
    app = App(tmp_path / "a")
    app.registry.create_domain("support", "Acme support.")
    ex = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in TRAIN]
    app.store.add_examples("support", ex)
    curate(app.store, "support", app.settings)          # the training snapshot drift compares against
    _ask(app, ASKED, 0)
    app.store.add_feedback(response_id="r0", rating="up")
    exporter = Exporter(app, refresh_s=None)

    first = _parse(exporter.text())
    assert _value(first, "assistant_answers", domain="support", version="base") == len(ASKED)
    assert _value(first, "assistant_feedback", domain="support", version="base", rating="up") == 1
    assert _value(first, "assistant_domain_broken", domain="support") == 0
    assert _value(first, "assistant_active_version", domain="support") == 0
    assert _value(first, "assistant_response_log_failures") == 0
    assert first["assistant_latency_seconds"][0] == "histogram"
    lat = first["assistant_latency_seconds"][1]
    assert lat[("assistant_latency_seconds_count", (("domain", "support"), ("version", "base")))] == len(ASKED)
    assert lat[("assistant_latency_seconds_bucket", (("domain", "support"), ("le", "0.05"), ("version", "base")))] == 2
    ttft = first["assistant_ttft_seconds"][1]
    assert ttft[("assistant_ttft_seconds_count", (("domain", "support"), ("version", "base")))] == len(ASKED) - 1
    assert "assistant_drift_ood_rate" not in first or not first["assistant_drift_ood_rate"][1]   # not computed yet
    _check_histograms(first)

    assert exporter.refresh() == ["support"]
    assert exporter.refresh() == []                       # nothing new: nothing recomputed
    second = _parse(exporter.text())
    calm = _value(second, "assistant_drift_ood_rate", domain="support")
    assert calm is not None and calm <= 0.5 and _value(second, "assistant_retrain_recommended", domain="support") == 0

    # New questions nobody embedded yet, and a user changing a thumbs up to a thumbs down.
    embedder = default_embedder()
    computed = embedder.computed
    _ask(app, UNSEEN, 100)
    app.store.add_feedback(response_id="r0", rating="down", correction="Hold reset for 10 s.")
    for _ in range(3):
        third = _parse(exporter.text())
    assert embedder.computed == computed                  # the scrapes embedded nothing...
    assert _value(third, "assistant_drift_ood_rate", domain="support") == calm   # ...and served the cache
    assert _value(third, "assistant_answers", domain="support", version="base") == len(ASKED) + len(UNSEEN)
    assert _value(third, "assistant_feedback", domain="support", version="base", rating="up") == 1   # not down to 0
    assert _value(third, "assistant_feedback", domain="support", version="base", rating="down") == 1
    assert _value(third, "assistant_corrections", domain="support", version="base") == 1
    _check_counters_grew(first, second)
    _check_counters_grew(second, third)
    _check_histograms(third)

    assert exporter.refresh() == ["support"]
    assert embedder.computed > computed                   # the refresh is what embeds
    assert _value(_parse(exporter.text()), "assistant_drift_ood_rate", domain="support") > calm

    # Another app in the same process: its own registry and numbers; the background refresh fills its gauges.
    other = App(tmp_path / "b")
    other.registry.create_domain("support")
    _ask(other, ASKED[:2], 0)
    try:
        parsed = _parse(prometheus_text(other))
        assert _value(parsed, "assistant_answers", domain="support", version="base") == 2
        assert exporter_for(other) is exporter_for(other) and exporter_for(other).registry is not exporter.registry
        deadline = time.monotonic() + 60
        while _value(parsed, "assistant_monitor_refreshed_timestamp_seconds", domain="support") is None:
            assert time.monotonic() < deadline, "the background refresh never ran"
            time.sleep(0.2)
            parsed = _parse(prometheus_text(other))
        assert _value(parsed, "assistant_drift_ood_rate", domain="support") is None   # no training data: no drift
    finally:
        thread = exporter_for(other)._thread
        close_exporter(other)
        assert not thread.is_alive()
