"""`assistant serve`: load the base, build the app (API + UI on one port), print what runs, listen."""

from __future__ import annotations

import sys
import time


def serve(settings) -> int:
    t0 = time.perf_counter()
    from .service import Service
    service = Service(settings)
    from .api import build_app
    app = build_app(service)
    import uvicorn
    url = f"http://{settings.host}:{settings.port}"
    print(f"serving UI at {url}/ and the OpenAI-compatible API at {url}/v1 "
          f"(ready in {time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)
    if settings.share:
        _share(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                            timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    try:
        server.run()
    finally:
        service.close()
    return 0


def _share(settings) -> None:
    """A public link through Gradio's share servers (auth is enforced by Settings)."""
    try:
        from .ui import share_tunnel
        url = share_tunnel(settings.host if settings.host != "0.0.0.0" else "127.0.0.1", settings.port)
        print(f"public link (behind --auth): {url}", file=sys.stderr, flush=True)
    except Exception as e:  # noqa: BLE001 - no network is a normal case here
        print(f"could not create a share link ({e}); serving locally only", file=sys.stderr, flush=True)
