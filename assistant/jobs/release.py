"""How a version a job published goes out when the gate passes: live for everyone through the one
activation path (`activate`), or, with the training setting `release: canary`, out as a canary beside the
live version (`send_out`), promoted or rolled back by its users' ratings (monitoring/canary.py)."""

from __future__ import annotations

from assistant.data.rollouts import Rollouts
from assistant.errors import AssistantError, Conflict
from assistant.settings import group_settings


def activate(settings, registry, domain: str, version: str, model, fingerprint: dict, store=None) -> str:
    """Make the published version live through the one activation path (remote.activate): a server running
    on this state activates it as a click would (validate, load on its engine and every vLLM server, then
    move the pointer); the job never moves the pointer itself then. With no server running, it is validated
    here against the base the job trained on, its weights read back, and the pointer moved offline.
    Returns where it was done (the server's URL or "offline")."""
    from assistant.cluster import remote
    from assistant.errors import ServerRefused

    def load(name: str, v: str) -> None:
        import torch
        from safetensors.torch import load_file

        from assistant.data.registry import ADAPTER_WEIGHTS, validate_adapter
        shapes = {n.removesuffix(".base_layer"): (m.in_features, m.out_features)
                  for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        folder = registry.version_path(name, v)
        validate_adapter(folder, fingerprint, shapes)
        load_file(str(folder / ADAPTER_WEIGHTS), device="cpu")

    try:
        return remote.activate(settings, registry, domain, version, offline_load=load, store=store)
    except ServerRefused as e:
        raise AssistantError(f"{domain}@{version} was published but did not go live: {e.message}") from None


def send_out(settings, store, registry, domain: str, version: str, job_id: str) -> str:
    """`release: canary`: out beside the live version (serving processes read rollouts from the store)."""
    share = group_settings(settings, "canary").share
    try:
        Rollouts(store).start(domain, version, registry.active_version(domain), share, by=f"job {job_id}")
        return f"{domain}@{version} is out as a canary to {share:.0%} of {domain}'s conversations\n"
    except Conflict as e:
        return f"{domain}@{version} was published but not sent out: {e.message}\n"
