"""More domains than adapter slots: requests wait for a slot instead of failing, oldest first, a quiet domain is
not starved by a busy one, and a request is refused (503 server_busy) only when it waited the named maximum."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from assistant.engine.engine import Engine, Request
from assistant.engine.model import load_base
from assistant.errors import Busy
from assistant.settings import Settings

from helpers import make_serving, random_lora_adapter

DOMAINS = ("alpha", "bravo", "charlie", "delta")
Q = [{"role": "user", "content": "Tell me about the weather"}]


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("sched-adapters")
    return {d: random_lora_adapter(tiny_llama, root / d, rank=4, std=0.5, seed=i + 1,
                                   targets=("q_proj", "v_proj", "down_proj"))
            for i, d in enumerate(DOMAINS)}


@pytest.fixture(scope="module")
def base(tiny_llama):
    return load_base(Settings(base_model=str(tiny_llama), dtype="float32"), verbose=False)


def request(engine, adapters, d, n=12, **kw):
    return Request(prompt_ids=engine.encode_chat(Q), max_new_tokens=n, ignore_eos=True, adapter=d,
                   adapter_folder=(lambda d=d: adapters[d]) if d else None, **kw)


def test_four_domains_on_two_slots_all_answer_as_alone(base, adapters):
    roomy = Engine(base, max_batch=8, max_resident_adapters=4)
    try:
        want = {d: roomy.submit(request(roomy, adapters, d)).result()[0] for d in (*DOMAINS, None)}
    finally:
        roomy.close()
    assert len(set(want.values())) == 5, "each adapter must answer differently"
    e = Engine(base, max_batch=8, max_resident_adapters=2)
    try:
        order = [DOMAINS[i % 4] if i % 5 else None for i in range(40)]
        handles = [e.submit(request(e, adapters, d)) for d in order]
        got = [h.result()[0] for h in handles]
        assert got == [want[d] for d in order]
        assert not any(e.runner.bank.in_use.values()) and not len(e.room) and not e.room.draining
    finally:
        e.close()


def test_a_quiet_domain_is_not_starved_by_a_busy_one(base, adapters):
    e = Engine(base, max_batch=4, max_resident_adapters=2)
    done = []
    try:
        busy = [e.submit(request(e, adapters, DOMAINS[i % 2], n=40), on_finish=lambda i=i: done.append(i))
                for i in range(16)]   # alpha and bravo take both slots
        quiet = e.submit(request(e, adapters, "charlie", n=4), on_finish=lambda: done.append("quiet"))
        quiet.result()
        for h in busy:
            h.result()
        assert done.index("quiet") <= 8, f"the quiet domain waited for {done.index('quiet')} of 16 busy requests"
    finally:
        e.close()


def test_waiting_past_the_maximum_is_refused_as_busy(base, adapters):
    e = Engine(base, max_batch=4, max_resident_adapters=1, max_queue_s=0.3)
    try:
        slot = e.load_adapter("alpha", adapters["alpha"], pin=True)   # held elsewhere: nothing frees it
        h = e.submit(request(e, adapters, "bravo"))
        with pytest.raises(Busy, match="busy"):
            h.result()
        assert h.req.finish_reason == "error"
        e.unpin(slot)
        assert e.submit(request(e, adapters, "bravo")).result()[1] == "length"   # and then it is served
    finally:
        e.close()


def test_eviction_prefers_a_slot_nobody_waits_for(base, adapters):
    e = Engine(base, max_batch=8, max_resident_adapters=2)
    try:
        for d in ("alpha", "bravo"):
            e.submit(request(e, adapters, d, n=1)).result()
        bank = e.runner.bank
        assert set(bank.slots) == {"alpha", "bravo"}
        e.runner.bank.slot_of("bravo")   # bravo used last: alpha is least recently used
        blocker = e.load_adapter("charlie", adapters["charlie"], pin=False)   # evicts alpha (LRU, nobody waits)
        assert set(bank.slots) == {"bravo", "charlie"} and blocker
        # Now alpha and bravo are wanted; bravo is resident and waited for, charlie is not: charlie goes.
        hs = [e.submit(request(e, adapters, d, n=30)) for d in ("bravo", "alpha", "bravo")]
        for h in hs:
            h.result()
        assert "bravo" in bank.slots and "alpha" in bank.slots
    finally:
        e.close()


def test_serving_queues_domains_beyond_the_slots(tiny_settings, adapters):
    s = make_serving(tiny_settings.with_(max_resident_adapters=2))
    try:
        for d in DOMAINS:
            s.workspace.create_domain(d)
            s.import_adapter(d, adapters[d], activate=True)
        alone = {d: s.chat(d, Q, max_tokens=8)["text"] for d in DOMAINS}
        with ThreadPoolExecutor(16) as pool:
            out = list(pool.map(lambda i: (DOMAINS[i % 4], s.chat(DOMAINS[i % 4], Q, max_tokens=8)), range(32)))
        assert all(r["text"] == alone[d] and r["adapter_version"] == "v1" for d, r in out)
    finally:
        s.close()
