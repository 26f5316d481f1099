"""The composition root: `assistant serve` builds the Workspace, the engine and the Serving, the FastAPI app
with the API routes, the Gradio UI and the auth middleware in front of all of them, the share link, and
listens. The one place these parts meet, and the one place engines are built (`build_engine`, which the
CLI's commands that chat call through `build` too); tests build their apps here as well (`build`,
`build_app`)."""

from __future__ import annotations

import logging
import signal
import time

log = logging.getLogger(__name__)


def build(settings, base=None, *, recover_jobs: bool = True):
    """(workspace, serving) for a server: jobs left by a dead server are recovered first (a CLI command,
    which may run beside a server, passes recover_jobs=False). `base`: a loaded base to serve (tests)."""
    from assistant.serving import Serving
    from assistant.workspace import Workspace
    workspace = Workspace(settings, recover_jobs=recover_jobs)
    try:
        engine = build_engine(settings, workspace, base)
    except BaseException:
        workspace.close()
        raise
    return workspace, Serving(workspace, engine)


def build_engine(settings, workspace, base=None):
    """The engine of `settings.engine`: the in-process one on `base` (loaded from the settings when None),
    or the one that drives vLLM servers."""
    if settings.engine == "vllm":
        return vllm_engine(settings, workspace)
    from assistant.engine.engine import Engine
    from assistant.engine.model import load_base
    base = base if base is not None else load_base(settings)
    return Engine(base, max_batch=settings.max_batch, max_queue=settings.max_queue,
                  max_resident_adapters=settings.max_resident_adapters)


def vllm_engine(settings, workspace):
    """The engine that drives vLLM servers: those of --vllm-url, or one started (and supervised) here."""
    from assistant.engine.model import describe_base
    from assistant.jobs.limits import engine_limits
    from assistant.vllm.engine import VllmEngine
    from assistant.vllm.server import ManagedVllm
    base = describe_base(settings)
    urls, managed, api_key = list(settings.vllm_url), None, settings.vllm_api_key
    if not urls:   # a random API key: no other local process can load or unload adapters on it
        managed = ManagedVllm(base.path, settings.state_path / "logs", served_name=base.name,
                              max_loras=settings.max_resident_adapters, max_lora_rank=engine_limits(settings).max_rank,
                              dtype=settings.dtype, gpu_memory_utilization=settings.gpu_memory_utilization,
                              api_key=settings.vllm_api_key).start()
        urls, api_key = [managed.url], managed.api_key
    return VllmEngine(base, urls, adapters_root=settings.adapters_path,
                      served_adapters_root=settings.vllm_adapters_path, live=workspace.live_versions,
                      max_resident=settings.max_resident_adapters, managed=managed, api_key=api_key)


def build_app(workspace, serving, *, with_ui: bool = True):
    """The one FastAPI app: the API routes, and the Gradio UI mounted at /, all behind one auth check."""
    from fastapi import FastAPI

    from assistant.api.auth import AuthMiddleware, Credentials
    from assistant.api.routes import build_api, install_error_handlers
    s = workspace.settings
    app = FastAPI(title="domain-assistant", docs_url="/api/docs", openapi_url="/api/openapi.json", redoc_url=None)
    app.state.credentials = Credentials(s.api_key, s.auth, secret=s.session_secret, directory=workspace.directory)
    install_error_handlers(app)
    app.include_router(build_api(workspace, serving))
    if with_ui:
        from assistant.ui import mount_ui
        mount_ui(app, workspace, serving, app.state.credentials)
    app.add_middleware(AuthMiddleware, credentials=app.state.credentials)
    if s.access_log != "off":   # outermost: what the auth check and the body guard refuse is logged too
        from assistant.api.access import AccessLog
        app.add_middleware(AccessLog, json_lines=s.access_log == "json")
    return app


def serve(settings) -> int:
    t0 = time.perf_counter()
    workspace, serving = build(settings)
    app = build_app(workspace, serving)
    import uvicorn
    url = f"http://{settings.host}:{settings.port}"
    log.info("serving UI at %s/ and the OpenAI-compatible API at %s/v1 (ready in %.1fs)", url, url,
             time.perf_counter() - t0)
    if settings.share:
        _share(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                            timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    from assistant.cluster import remote
    # uvicorn re-raises the SIGTERM it caught once it has shut down: end through Python then, so the finally
    # below runs (the server file removed, the engine and a managed vLLM server stopped)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    local = f"http://{'127.0.0.1' if settings.host in ('0.0.0.0', '::') else settings.host}:{settings.port}"
    app.state.credentials.control_token = remote.announce(settings, local)   # jobs and the CLI find us here
    from assistant.replicas import ReplicaSync
    sync = ReplicaSync(workspace, serving).start()   # other replicas' activations, workers' requests, queued jobs
    try:
        server.run()
    finally:
        sync.close()
        remote.withdraw(settings)
        serving.close()
        workspace.close()
    return 0


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _share(settings) -> None:
    """A public link through Gradio's share servers (auth is enforced by Settings)."""
    try:
        from assistant.ui import share_tunnel
        url = share_tunnel(settings.host if settings.host != "0.0.0.0" else "127.0.0.1", settings.port)
        log.info("public link (behind --auth): %s", url)
    except Exception as e:  # noqa: BLE001 - no network is a normal case here
        log.warning("could not create a share link (%s); serving locally only", e)
