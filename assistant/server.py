"""`assistant serve`: load the base, build the app (API + UI on one port), print what runs, listen."""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def serve(settings) -> int:
    t0 = time.perf_counter()
    from .service import Service
    service = Service(settings)
    from .api import build_app
    app = build_app(service)
    import uvicorn
    url = f"http://{settings.host}:{settings.port}"
    log.info("serving UI at %s/ and the OpenAI-compatible API at %s/v1 (ready in %.1fs)", url, url,
             time.perf_counter() - t0)
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
        log.info("public link (behind --auth): %s", url)
    except Exception as e:  # noqa: BLE001 - no network is a normal case here
        log.warning("could not create a share link (%s); serving locally only", e)
