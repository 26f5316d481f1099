"""The engine interface through the Serving: the one status shape, loading and unloading a version,
cancelling a request (the vLLM engine's side is tested against a real server in test_vllm_serving.py)."""

from __future__ import annotations

import time

import pytest

from assistant.engine.protocol import EngineStatus

from helpers import make_serving

pytestmark = pytest.mark.slow


def test_status_load_unload_and_cancel_through_the_interface(tiny_settings, two_fact_adapters):
    svc = make_serving(tiny_settings)
    try:
        status = svc.status()["engine"]
        assert set(status) == set(EngineStatus.__annotations__)
        assert status["kind"] == "local" and status["ready"] and status["servers"] == [] and status["adapters"] == []
        svc.workspace.create_domain("geo")
        svc.import_adapter("geo", two_fact_adapters[0], activate=True)
        assert svc.status()["engine"]["adapters"] == ["geo@v1"]
        svc.engine.unload_adapter("geo@v1")
        assert svc.status()["engine"]["adapters"] == []
        call = svc.start_chat("geo", [{"role": "user", "content": "What is the capital of Zorbania?"}],
                              max_tokens=400, ignore_eos=True)
        deadline = time.monotonic() + 120   # the engine loads it again when the request's turn comes
        while svc.status()["engine"]["adapters"] != ["geo@v1"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert svc.status()["engine"]["adapters"] == ["geo@v1"]     # loaded again for the request
        svc.engine.cancel(call.handle)
        _, reason = call.handle.result()
        assert reason == "cancelled" and len(call.handle.req.generated) < 400
        assert svc.finish_chat(call)
        assert svc.workspace.logs("geo", 1)[0]["finish_reason"] == "cancelled"
    finally:
        svc.close()
