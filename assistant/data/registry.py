"""Domains and their adapter versions on disk, and the checks an adapter passes before it can go live.

Layout (all under `adapters_dir`):
    <domain>/domain.toml        system prompt, description
    <domain>/active             the active version's name ("v3"), replaced atomically
    <domain>/v1, v2, ...        immutable PEFT folders: adapter_config.json, adapter_model.safetensors, card.json
    <domain>/.staging-*         work in progress; never listed, removed at start
    <domain>/.retired-vN        a version taken back (an import the engine refused): never listed, its number kept
    <domain>/.activate.lock     held while the domain's live version changes: one change at a time, across
                                threads and processes (`activation_lock`)

Nothing here imports torch: validation reads safetensors headers and JSON only, and nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import threading
import time
import tomllib
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from assistant.errors import AssistantError, Conflict, InvalidAdapter, InvalidName, NotFound
from assistant.files import TMP_SUFFIX, atomic_write_text, fsync_dir, fsync_tree
from assistant.settings import BASE, MAX_LORA_RANK, NAME_RE

VERSION_RE = re.compile(r"^v[1-9][0-9]{0,8}$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
CARD = "card.json"
ACTIVATE_LOCK = ".activate.lock"
RETIRED_PREFIX = ".retired-"   # + vN: a version taken out of the list whose number is never given again
MAX_SYSTEM_PROMPT_CHARS = 8000
MAX_DESCRIPTION_CHARS = 2000

log = logging.getLogger(__name__)
_held = threading.local()      # the activation locks this thread holds (a rollback holds it around activate)


def check_name(name: object) -> str:
    """A domain name per docs/API.md, or InvalidName that says the rule. Checked before any path is built."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name == BASE:
        shown = repr(name)[:80]
        raise InvalidName(f"domain name {shown} is not allowed: use 1-64 lowercase letters, digits, '-' or '_', "
                          f"starting with a letter or digit (and not {BASE!r})", param="name")
    return name


def check_version(version: object) -> str:
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise InvalidName(f"version {repr(version)[:40]} is not allowed: versions look like v1, v2, ...", param="version")
    return version


def parse_model_name(model: str) -> tuple[str | None, str | None]:
    """'base' -> (None, None); 'support' -> ('support', None); 'support@v2' -> ('support', 'v2')."""
    if model == BASE:
        return None, None
    name, sep, version = model.partition("@")
    check_name(name)
    return name, (check_version(version) if sep else None)


def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a valid TOML basic string


@dataclass
class Domain:
    name: str
    system_prompt: str
    description: str
    active_version: str | None
    versions: list[str] = field(default_factory=list)
    problem: str | None = None     # why the domain cannot serve (a broken active pointer, unreadable settings)
    trust_users: bool = False      # feedback from `user` accounts trains without an editor's review

    def as_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "system_prompt": self.system_prompt,
                "active_version": self.active_version, "versions": list(self.versions),
                "status": "broken" if self.problem else "ok", "problem": self.problem,
                "trust_users": self.trust_users}


def version_key(v: str) -> int:
    return int(v[1:])


class Registry:
    def __init__(self, adapters_dir: Path):
        self.root = Path(adapters_dir)
        self.root.mkdir(parents=True, exist_ok=True)

    # Domains ----------------------------------------------------------------------------------
    def domain_dir(self, name: str) -> Path:
        return self.root / check_name(name)

    def exists(self, name: str) -> bool:
        return (self.domain_dir(name) / "domain.toml").is_file()

    def create_domain(self, name: str, system_prompt: str = "", description: str = "",
                      trust_users: bool = False) -> Domain:
        check_name(name)
        if not isinstance(system_prompt, str) or len(system_prompt) > MAX_SYSTEM_PROMPT_CHARS:
            raise AssistantError(f"system_prompt must be text of at most {MAX_SYSTEM_PROMPT_CHARS} characters",
                                 param="system_prompt")
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
            raise AssistantError(f"description must be text of at most {MAX_DESCRIPTION_CHARS} characters",
                                 param="description")
        d = self.domain_dir(name)
        d.mkdir(parents=True, exist_ok=True)
        # Created exclusively (the link fails if the name exists: 409), so a crash never leaves a
        # half-written domain.toml behind and two creators never both win.
        try:
            atomic_write_text(d / "domain.toml", f"system_prompt = {_toml_str(system_prompt)}\n"
                                                 f"description = {_toml_str(description)}\n"
                                                 f"trust_users = {'true' if trust_users else 'false'}\n", exclusive=True)
        except FileExistsError:
            raise Conflict(f"domain {name!r} already exists: pick another name or use it") from None
        return self.get_domain(name)

    def get_domain(self, name: str) -> Domain:
        """The domain's settings and versions. A domain that cannot serve comes back with `problem` set
        (and is logged): an unreadable domain.toml, or an active pointer to a version that is not there."""
        d = self.domain_dir(name)
        problems = []
        try:
            meta = tomllib.loads((d / "domain.toml").read_text())
        except FileNotFoundError:
            raise NotFound(f"no domain {name!r}: create it first (POST /api/domains)") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            log.error("%s/domain.toml is unreadable: %s", name, e)
            meta = {}
            problems.append(f"its settings file {name}/domain.toml is not valid TOML (in the adapters folder): "
                            "fix or recreate it")
        active = self.active_version(name)
        pointer = self.active_pointer(name)
        if pointer is not None and active is None:
            log.error("domain %s: the active pointer names %r, which is not a complete version", name, pointer)
            problems.append(f"its active version {pointer[:20]!r} is missing or incomplete: activate another "
                            "version (Adapters tab, or POST /api/domains/{name}/adapters/vN/activate)".replace("{name}", name))
        return Domain(name=name, system_prompt=str(meta.get("system_prompt", "")),
                      description=str(meta.get("description", "")), active_version=active,
                      versions=self.versions(name), problem="; ".join(problems) or None,
                      trust_users=meta.get("trust_users") is True)

    def list_domains(self) -> list[Domain]:
        return [self.get_domain(p.name) for p in (sorted(self.root.iterdir()) if self.root.is_dir() else [])
                if p.is_dir() and NAME_RE.fullmatch(p.name) and (p / "domain.toml").is_file()]

    # Versions ---------------------------------------------------------------------------------
    def versions(self, name: str) -> list[str]:
        d = self.domain_dir(name)
        if not d.is_dir():
            return []
        vs = [p.name for p in d.iterdir()
              if p.is_dir() and VERSION_RE.fullmatch(p.name) and (p / ADAPTER_WEIGHTS).is_file()]
        return sorted(vs, key=version_key)

    def version_path(self, name: str, version: str) -> Path:
        p = self.domain_dir(name) / check_version(version)
        if not (p / ADAPTER_WEIGHTS).is_file():
            raise NotFound(f"{name}@{version} does not exist; versions: {', '.join(self.versions(name)) or 'none yet'}")
        return p

    def read_card(self, name: str, version: str) -> dict:
        """The version's card. An unreadable card is reported in the card itself (`problem`) and logged:
        the version still serves, but its history and metrics are lost."""
        path = self.version_path(name, version) / CARD
        try:
            card = json.loads(path.read_text())
            if not isinstance(card, dict):
                raise ValueError("not a JSON object")
            return card
        except FileNotFoundError:
            return {"problem": f"{name}@{version} has no card.json: its training history is unknown"}
        except (ValueError, UnicodeDecodeError) as e:
            log.error("%s/%s/card.json is unreadable: %s", name, version, e)
            return {"problem": f"the card of {name}@{version} is not valid JSON: its metrics and history are lost "
                               "(the adapter itself still serves)"}

    def active_pointer(self, name: str) -> str | None:
        """What the `active` file says, valid or not (None when there is no active version)."""
        try:
            return (self.domain_dir(name) / "active").read_text().strip() or None
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            return "(unreadable)"

    def active_version(self, name: str) -> str | None:
        v = self.active_pointer(name)
        if v is None:
            return None
        return v if VERSION_RE.fullmatch(v) and (self.domain_dir(name) / v / ADAPTER_WEIGHTS).is_file() else None

    def active_stamp(self, name: str) -> float:
        """Changes whenever the active pointer is replaced: cheap to poll per request."""
        try:
            return (self.domain_dir(name) / "active").stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    @contextlib.contextmanager
    def activation_lock(self, name: str):
        """While held, no other thread or process changes `name`'s live version: what a caller reads (the
        version a rollback leaves, the gate's verdict) is still true when its pointer moves. Re-entrant in
        one thread; an flock on the domain's `.activate.lock`, released by the kernel if the holder dies."""
        path = str(self.domain_dir(name) / ACTIVATE_LOCK)
        held = _held.__dict__.setdefault("paths", set())
        if path in held:
            yield
            return
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            held.add(path)
            try:
                yield
            finally:
                held.discard(path)
                fcntl.flock(f, fcntl.LOCK_UN)

    def activate(self, name: str, version: str, *, load) -> None:
        """The one path to live, for every caller (server, training job, CLI, rollback): `load(name, version)`
        validates the version against the running base and loads it (raising when it cannot serve), and
        only then is the pointer replaced, atomically. A version that cannot load never becomes active.
        Changes of one domain's live version happen one at a time (`activation_lock`)."""
        with self.activation_lock(name):
            self.version_path(name, version)  # exists
            load(name, version)
            atomic_write_text(self.domain_dir(name) / "active", version + "\n")
        log.info("activated %s@%s", name, version)

    def deactivate(self, name: str) -> None:
        """Back to the base weights: the domain answers with its system prompt alone (no adapter)."""
        with self.activation_lock(name):
            atomic_write_text(self.domain_dir(name) / "active", "")
        log.info("deactivated %s: base weights", name)

    def record_override(self, name: str, version: str, user: str | None) -> dict:
        """Note in the version's card that a person activated it against the gate's verdict."""
        card = self.read_card(name, version)
        card["manual_override"] = {"by": user or "anonymous", "at": time.time()}
        atomic_write_text(self.version_path(name, version) / CARD, json.dumps(card, indent=1, sort_keys=True))
        return card

    def gate_verdict(self, name: str, version: str) -> dict:
        """The gate's verdict in the version's card ({} for an imported version, which no gate judged)."""
        return (self.read_card(name, version).get("metrics") or {}).get("gate") or {}

    def record_canary(self, name: str, version: str, outcome: dict) -> dict:
        """Note in the version's card how its canary rollout ended and why (promoted, rolled back, stopped)."""
        card = self.read_card(name, version)
        card["canary"] = {**outcome, "at": time.time()}
        atomic_write_text(self.version_path(name, version) / CARD, json.dumps(card, indent=1, sort_keys=True))
        return card

    def previous_version(self, name: str) -> str:
        """The version a rollback goes to: the newest one older than the active version, or the base
        weights (`BASE`) from the oldest."""
        from assistant.settings import BASE
        active = self.active_version(name)
        older = [v for v in self.versions(name) if active and version_key(v) < version_key(active)]
        if not older and active:
            return BASE
        if not older:
            raise NotFound(f"{name} has no version older than {active or 'the base weights'} to roll back to",
                           param="version")
        return older[-1]

    def adapters(self, name: str) -> list[dict]:
        active = self.active_version(name)
        return [{"version": v, "active": v == active, "card": self.read_card(name, v)} for v in self.versions(name)]

    # Publishing -------------------------------------------------------------------------------
    def new_staging(self, name: str, tag: str | None = None) -> Path:
        """A fresh `.staging-<tag>` folder (a random tag by default) in the domain's folder."""
        if not self.exists(name):
            raise NotFound(f"no domain {name!r}: create it first")
        p = self.domain_dir(name) / f".staging-{tag or uuid.uuid4().hex}"
        shutil.rmtree(p, ignore_errors=True)     # a leftover of the same job (a named tag only)
        p.mkdir()
        return p

    def publish(self, name: str, staging: Path, card: dict) -> str:
        """fsync every file, write card.json (durably), then rename the staging folder to the next vN.

        The rename is the commit point: a crash before it leaves only a .staging-* folder, which is
        never listed and is removed at the next start."""
        staging = Path(staging)
        card = dict(card)
        card.setdefault("created_at", time.time())
        fsync_tree(staging)
        d = self.domain_dir(name)
        while True:
            existing = [version_key(p.name.removeprefix(RETIRED_PREFIX)) for p in d.iterdir()
                        if VERSION_RE.fullmatch(p.name.removeprefix(RETIRED_PREFIX))]   # retired numbers stay taken
            version = f"v{max(existing, default=0) + 1}"
            card["version"] = version
            atomic_write_text(staging / CARD, json.dumps(card, indent=1, sort_keys=True))
            try:
                os.rename(staging, d / version)  # fails if vN appeared meanwhile (non-empty dir)
            except OSError:
                if (d / version).exists():
                    continue
                raise
            fsync_dir(d)
            return version

    def import_folder(self, name: str, folder: Path, base_fingerprint: dict, module_shapes: dict,
                      *, max_rank: int = MAX_LORA_RANK, card: dict | None = None) -> str:
        """Validate an adapter folder, copy it into staging and publish it as the next version."""
        if not self.exists(name):
            raise NotFound(f"no domain {name!r}: create it first")
        validate_adapter(Path(folder), base_fingerprint, module_shapes, max_rank=max_rank)
        staging = self.new_staging(name)
        try:
            for fname in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                shutil.copyfile(Path(folder) / fname, staging / fname)
            merged = {**uploaded_card(Path(folder)), **(card or {}), "base_fingerprint": base_fingerprint,
                      "imported": True}
            return self.publish(name, staging, merged)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def retire(self, name: str, version: str) -> None:
        """Take a published version out of the list (an import the serving engine refused) without freeing its
        number: it becomes `.retired-vN`, and the next version is vN+1, so a serving engine never sees one
        name for two different adapters."""
        folder = self.version_path(name, version)
        os.rename(folder, folder.with_name(RETIRED_PREFIX + version))
        fsync_dir(folder.parent)

    def cleanup_staging(self, keep: set[str] | frozenset = frozenset(), older_than_s: float = 0.0) -> int:
        """Remove leftover staging folders (a crash before publishing), except those named in `keep` (running
        jobs' folders, work a failed job can resume) and, with `older_than_s`, those younger than that
        (another replica's import)."""
        n = 0
        now = time.time()
        for d in self.root.iterdir() if self.root.is_dir() else []:
            if d.is_dir():
                for s in d.glob(".staging-*"):
                    # a job's later attempts go with its first (".staging-job-<id>.attempt-2")
                    if s.name in keep or s.name.split(".attempt-")[0] in keep or (
                            older_than_s and now - s.stat().st_mtime < older_than_s):
                        continue
                    shutil.rmtree(s, ignore_errors=True)
                    n += 1
                for t in d.glob(f".*{TMP_SUFFIX}"):
                    t.unlink(missing_ok=True)
        return n


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def tensor_shapes(path: Path) -> dict[str, list[int]]:
    """{tensor name: shape} of a safetensors file, read by safetensors itself (`safe_open`: the header only,
    checked against the file, so a truncated or corrupt upload is refused; no tensor data is read)."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="np") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        reason = str(e).removeprefix("Error while deserializing header: ")
        raise InvalidAdapter(f"{path.name} is not a valid safetensors file ({reason}): the upload is probably "
                             "truncated or corrupt; export the adapter again") from None


def _module_of(key: str) -> tuple[str, str] | None:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' -> ('model.layers.0.self_attn.q_proj', 'A')."""
    m = re.match(r"^(?:base_model\.model\.)?(.+?)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
    return (m.group(1), m.group(2)) if m else None


def validate_adapter(folder: Path, base_fingerprint: dict, module_shapes: dict[str, tuple[int, int]],
                     *, max_rank: int = MAX_LORA_RANK) -> dict:
    """Every check an adapter passes before it can load. Returns its parsed config.

    module_shapes maps the base's linear module names to (in_features, out_features)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidAdapter(f"the adapter {folder.name!r} is not a folder: upload a zip of a PEFT LoRA folder")
    pickles = sorted(p.name for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise InvalidAdapter(f"refused {', '.join(pickles)}: pickle-based weights can run code when loaded, so only "
                             f"safetensors are accepted. Save the adapter with safe_serialization=True "
                             f"({ADAPTER_WEIGHTS})")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise InvalidAdapter(f"no {ADAPTER_WEIGHTS} in the adapter: save it with PEFT's save_pretrained "
                             "(safe_serialization=True)")
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        raise InvalidAdapter(f"no {ADAPTER_CONFIG} in the adapter: it must be a PEFT LoRA folder") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidAdapter(f"{ADAPTER_CONFIG} is not valid JSON ({e}): fix it or export the adapter again") from None
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise InvalidAdapter(f"adapter type {config.get('peft_type')!r} is not supported: only LoRA adapters load here")
    r = config.get("r")
    if not isinstance(r, int) or r < 1:
        raise InvalidAdapter(f"{ADAPTER_CONFIG} has no valid rank 'r' ({r!r})")
    if r > max_rank:
        raise InvalidAdapter(f"rank {r} is over this server's cap of {max_rank}: retrain with a smaller rank")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise InvalidAdapter("per-module rank_pattern/alpha_pattern is not supported: retrain with one rank")
    if config.get("use_dora") or config.get("modules_to_save"):
        raise InvalidAdapter("DoRA and modules_to_save adapters are not supported: train a plain LoRA adapter")
    card = {}
    if (folder / CARD).is_file():
        try:
            card = json.loads((folder / CARD).read_text())
        except ValueError as e:
            raise InvalidAdapter(f"{CARD} is not valid JSON ({e}): fix it or remove it") from None
    fp = card.get("base_fingerprint") if isinstance(card, dict) else None
    if fp:
        want = base_fingerprint
        if fp.get("shapes") != want.get("shapes") or fp.get("config_hash") != want.get("config_hash"):
            raise InvalidAdapter(f"this adapter was trained on {fp.get('name', 'another base')} with other shapes; "
                                 f"the server runs {want.get('name')}: retrain it on this base or start the server "
                                 f"with --base-model set to the adapter's base")
        if fp.get("weights_hash") != want.get("weights_hash"):
            raise InvalidAdapter(f"this adapter was trained on a different base ({fp.get('name')}, weights "
                                 f"{fp.get('weights_hash')}) than the server's {want.get('name')} (weights "
                                 f"{want.get('weights_hash')}): retrain it on this base or serve its own base")
    shapes = tensor_shapes(folder / ADAPTER_WEIGHTS)
    if not shapes:
        raise InvalidAdapter(f"{ADAPTER_WEIGHTS} holds no tensors")
    seen = set()
    for key, shape in shapes.items():
        parsed = _module_of(key)
        if parsed is None:
            raise InvalidAdapter(f"unexpected tensor {key!r}: only LoRA A/B weights are accepted")
        module, ab = parsed
        if module not in module_shapes:
            raise InvalidAdapter(f"the adapter targets {module!r}, which the base {base_fingerprint.get('name')} "
                                 f"does not have: it was trained for another architecture")
        fin, fout = module_shapes[module]
        want_shape = [r, fin] if ab == "A" else [fout, r]
        if shape != want_shape:
            raise InvalidAdapter(f"tensor {key} has shape {shape}, expected {want_shape} for this base: "
                                 f"the adapter was trained on a base of other shapes; retrain it on this base")
        seen.add((module, ab))
    modules = {m for m, _ in seen}
    for m in modules:
        if (m, "A") not in seen or (m, "B") not in seen:
            raise InvalidAdapter(f"{m} has only one of its LoRA A/B weights: export the adapter again")
    return config


def safe_unzip(zpath: Path, dest: Path, max_bytes: int) -> None:
    """Extract only the adapter files, flattening folders; refuse links, absolute paths and '..'."""
    dest.mkdir(parents=True)
    try:
        with zipfile.ZipFile(zpath) as z:
            total = 0
            for info in z.infolist():
                if info.is_dir():
                    continue
                name = info.filename.replace("\\", "/")
                if name.startswith("/") or ".." in name.split("/") or "\x00" in name:
                    raise InvalidAdapter(f"refused zip entry {name!r}: paths must stay inside the archive")
                base = name.rsplit("/", 1)[-1]
                if base.startswith(".") or base.startswith("__MACOSX"):
                    continue
                total += info.file_size
                if total > max_bytes:
                    raise InvalidAdapter("the zip expands past the upload limit")
                if (dest / base).exists():
                    raise InvalidAdapter(f"the zip holds two files named {base}: zip one adapter folder")
                with z.open(info) as src, open(dest / base, "wb") as out:
                    shutil.copyfileobj(src, out)
    except zipfile.BadZipFile as e:
        raise InvalidAdapter(f"not a valid zip file ({e}): zip the adapter folder and upload again") from None


def uploaded_card(folder: Path) -> dict:
    """What an uploaded adapter's own card.json may bring: its description, nothing else. Gate metrics, job
    ids, overrides and authorship are the server's to write, so a forged card can't claim them."""
    try:
        card = json.loads((folder / CARD).read_text())
    except (OSError, ValueError):
        return {}
    text = card.get("description") if isinstance(card, dict) else None
    return {"description": text[:MAX_DESCRIPTION_CHARS]} if isinstance(text, str) and text.strip() else {}

