"""A domain's live version changes one change at a time: a rollback clicked while an activation is still
loading waits for it, then rolls back from the version that activation made live (not from the one it read
before); in another process, an activation waits the same way (the lock is a file lock on the domain)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from assistant.data.registry import ADAPTER_WEIGHTS, CARD
from assistant.settings import Settings
from assistant.workspace import Workspace


def _versions(ws: Workspace, domain: str, n: int) -> None:
    for _ in range(n):
        staging = ws.registry.new_staging(domain)
        (staging / ADAPTER_WEIGHTS).write_bytes(b"")       # the registry only lists; nothing loads it here
        ws.registry.publish(domain, staging, {"metrics": {"gate": {"promote": True}}})


def test_a_rollback_clicked_during_an_activation_waits_and_rolls_back_from_what_it_made_live(tmp_path):
    ws = Workspace(Settings(home=tmp_path).ensure_dirs())
    try:
        ws.create_domain("atlas")
        _versions(ws, "atlas", 3)
        ws.activate("atlas", "v1", load=lambda d, v: None)
        loading, release, order = threading.Event(), threading.Event(), []

        def slow_load(domain, version):      # a load that takes a while (a large adapter on vLLM)
            loading.set()
            release.wait(30)
            order.append(f"loaded {version}")

        def quick_load(domain, version):
            order.append(f"loaded {version}")
        activation = threading.Thread(target=lambda: ws.activate("atlas", "v3", load=slow_load))
        activation.start()
        assert loading.wait(10)
        rolled = []
        rollback = threading.Thread(target=lambda: rolled.append(ws.rollback("atlas", load=quick_load)))
        rollback.start()
        rollback.join(0.5)
        assert not rolled and ws.registry.active_version("atlas") == "v1"   # waits; nothing moved yet
        release.set()
        activation.join(10)
        rollback.join(10)
        assert order == ["loaded v3", "loaded v2"]
        assert rolled == [{"domain": "atlas", "active_version": "v2"}]        # from v3, the version before it
        assert ws.registry.active_version("atlas") == "v2"

        # another process holding the domain's lock: an activation here waits for it
        holder = subprocess.Popen([sys.executable, "-c", (
            "import sys, time\n"
            "from assistant.data.registry import Registry\n"
            "with Registry(sys.argv[1]).activation_lock('atlas'):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(1.5)\n"), str(ws.registry.root)], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        ws.activate("atlas", "v1", load=quick_load)
        assert time.monotonic() - t0 >= 0.5 and ws.registry.active_version("atlas") == "v1"
        holder.wait(10)
        assert (ws.registry.version_path("atlas", "v1") / CARD).is_file()
    finally:
        release.set()
        ws.close()
