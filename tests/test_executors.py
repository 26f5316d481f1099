"""Slow control work never keeps a chat waiting for a thread: with every control thread held (as activations,
curations or exports that take minutes would hold them), a chat through the app's own routes still answers,
while a control route waits its turn and answers once a thread frees."""

from __future__ import annotations

import threading

from helpers import make_serving


def test_control_work_holding_every_control_thread_keeps_no_chat_waiting(tiny_settings):
    from fastapi.testclient import TestClient

    from assistant.api import executors
    from assistant.server import build_app
    serving = make_serving(tiny_settings)
    release = threading.Event()
    try:
        with TestClient(build_app(serving.workspace, serving, with_ui=False)) as client:
            held = [executors._control.submit(release.wait, 60) for _ in range(executors.CONTROL_THREADS)]
            answers, listings = [], []
            listing = threading.Thread(target=lambda: listings.append(client.get("/api/domains")))
            listing.start()
            chat = threading.Thread(target=lambda: answers.append(client.post("/v1/chat/completions", json={
                "model": "base", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})))
            chat.start()
            chat.join(60)
            assert answers and answers[0].status_code == 200, answers
            listing.join(0.5)
            assert not listings                       # the control route queues behind the held threads
            release.set()
            listing.join(60)
            assert listings and listings[0].status_code == 200, listings
            assert all(h.result(60) for h in held)
    finally:
        release.set()
        serving.close()
        serving.workspace.close()
