"""The Hugging Face Hub in and out: snapshot downloads, remote headers, and pushes.

Nothing else in ``surgery`` touches the network. Every call reads its settings from the environment
*at call time* (``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_TOKEN``), not from the values
``huggingface_hub`` froze at import, so a process can point at another endpoint or go offline
without re-importing anything. Every failure (missing repo, revision or file, a gated repo, the
network, authentication) becomes one :class:`~surgery.errors.SurgeryError` that says how to fix it.

Tokens come from the ``token`` argument, ``HF_TOKEN``, or the saved login (``hf auth login``), in
that order. They are handed to ``huggingface_hub`` and never printed, logged, or written anywhere;
error messages are scrubbed of them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import HUB_ID, PICKLE_SUFFIXES, TensorInfo
from .errors import SurgeryError

__all__ = [
    "ALLOW_PATTERNS",
    "RemoteHeaders",
    "check_push",
    "commit_text",
    "download",
    "endpoint",
    "is_offline",
    "push",
    "remote_headers",
    "remote_source",
]

logger = logging.getLogger("surgery")

# What a snapshot download fetches: weights, configs, tokenizer files, the card. Never pickles.
ALLOW_PATTERNS = [
    "*.safetensors", "*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "README.md",
]  # fmt: skip
LOGIN_HINT = (
    "log in with `hf auth login` (or `huggingface-cli login`), set HF_TOKEN, or pass --token; "
    "create a token with write access at https://huggingface.co/settings/tokens"
)
_TRUE = {"1", "true", "yes", "on", "y", "t"}


def endpoint() -> str:
    """The Hub endpoint: ``HF_ENDPOINT`` now, else the one ``huggingface_hub`` was imported with."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set now or was at import."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def _cache_dir() -> str | None:
    # huggingface_hub computes its cache path at import; honour a later HF_HUB_CACHE/HF_HOME too.
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None


def _scrub(text: str, token: str | None) -> str:
    """Remove the token from a message (defence in depth: the client should never echo it)."""
    return text.replace(token, "***") if token else text


def _repo_ref(repo_id: str, revision: str | None) -> str:
    return f"{repo_id}@{revision}" if revision else repo_id


def _network_error(e: BaseException) -> bool:
    # httpx2/httpx/requests transport errors share no base class with OSError in every version.
    mod = type(e).__module__.split(".")[0]
    return isinstance(e, (ConnectionError, TimeoutError)) or mod in {
        "httpx", "httpx2", "httpcore", "requests", "urllib3",
    }  # fmt: skip


def _hub_error(e: BaseException, what: str, ref: str, token: str | None = None) -> SurgeryError:
    """Translate a ``huggingface_hub``/transport exception into one actionable SurgeryError."""
    from huggingface_hub import errors as hf

    url = endpoint()
    if isinstance(e, hf.GatedRepoError):
        repo = ref.split("@")[0]
        return SurgeryError(
            f"{what}: {repo} is a gated repo; accept its conditions at {url}/{repo} and "
            f"use a token of that account ({LOGIN_HINT})"
        )
    if isinstance(e, hf.RepositoryNotFoundError):
        return SurgeryError(
            f"{what}: repo {ref.split('@')[0]} not found on {url}; check the id (org/name). "
            f"If it is private, {LOGIN_HINT}"
        )
    if isinstance(e, hf.RevisionNotFoundError):
        return SurgeryError(
            f"{what}: revision {ref.partition('@')[2] or 'main'!r} not found in "
            f"{ref.split('@')[0]}; use an existing branch, tag or commit hash "
            f"(see {url}/{ref.split('@')[0]}/tree/main)"
        )
    if isinstance(e, hf.OfflineModeIsEnabled):
        return SurgeryError(
            f"{what}: HF_HUB_OFFLINE=1 forbids network access; unset it to use the Hub"
        )
    if isinstance(e, hf.EntryNotFoundError):
        return SurgeryError(
            f"{what}: a file is missing from {ref} ({_scrub(str(e), token)}); "
            "check the repo contents or choose another revision"
        )
    if isinstance(e, hf.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        server = _scrub(str(e).strip().splitlines()[0] if str(e).strip() else "", token)
        if status == 401:
            return SurgeryError(
                f"{what}: authentication failed on {url} (the token was rejected); {LOGIN_HINT}"
            )
        if status == 403:
            need = "write" if what.startswith("cannot push") else "read"
            return SurgeryError(
                f"{what}: the token may not {need} {ref.split('@')[0]} ({server}); use a token "
                f"with {need} access to that namespace (https://huggingface.co/settings/tokens)"
            )
        return SurgeryError(f"{what}: the Hub answered HTTP {status} for {ref}: {server}")
    if isinstance(e, hf.HFValidationError):
        return SurgeryError(
            f"{what}: {ref!r} is not a valid Hub repo id ({e}); expected org/name[@revision]"
        )
    if _network_error(e):
        return SurgeryError(
            f"{what}: cannot reach {url} ({type(e).__name__}: {_scrub(str(e), token)}); check "
            "the network (or HF_ENDPOINT), or set HF_HUB_OFFLINE=1 to use the local cache"
        )
    raise e  # an unexpected exception type is a bug: keep its traceback


# -- in: downloads ------------------------------------------------------------------------------
def download(
    repo_id: str, revision: str | None = None, *, token: str | None = None
) -> tuple[Path, str]:
    """Fetch a Hub model's weights, configs, tokenizer and card into the standard HF cache.

    Only ``ALLOW_PATTERNS`` are fetched: ``*.safetensors``, ``*.json``, tokenizer files and
    ``README.md``, never ``*.bin``/``*.pt`` pickles. With ``HF_HUB_OFFLINE=1`` only the cache is
    used.

    Args:
        repo_id: ``org/name``.
        revision: branch, tag, ``refs/pr/N`` or commit hash; ``None`` for the default branch.
        token: overrides ``HF_TOKEN`` / the saved login (needed for private or gated repos).

    Returns:
        ``(snapshot folder, resolved commit hash)``.

    Raises:
        SurgeryError: missing repo or revision, a gated repo, no network (or offline with a cold
            cache), a rejected token, or a repo without safetensors weights.
    """
    from huggingface_hub import errors as hf
    from huggingface_hub import snapshot_download

    ref = _repo_ref(repo_id, revision)
    offline = is_offline()
    auth = _auth(token)
    secret = auth if isinstance(auth, str) else None  # scrubbed from any message
    try:
        local = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=ALLOW_PATTERNS,
                cache_dir=_cache_dir(),
                endpoint=endpoint(),
                token=auth,
                local_files_only=offline,
            )
        )
    except hf.LocalEntryNotFoundError as e:
        if offline or isinstance(e.__cause__, hf.OfflineModeIsEnabled):
            raise SurgeryError(
                f"{ref} is not in the local Hub cache ({_cache_dir() or 'the default cache'}) and "
                "HF_HUB_OFFLINE=1 forbids downloading it; unset HF_HUB_OFFLINE once to fetch it, "
                "or pass a local folder"
            ) from None
        cause = e.__cause__
        if isinstance(cause, hf.HfHubHTTPError):
            raise _hub_error(cause, f"cannot download {ref}", ref, secret) from None
        raise SurgeryError(
            f"cannot download {ref}: {endpoint()} is unreachable and the repo is not in the local "
            f"cache ({type(cause).__name__ if cause else 'no cache'}); check the network "
            "(or HF_ENDPOINT) and retry"
        ) from None
    except Exception as e:  # noqa: BLE001 - mapped to SurgeryError or re-raised as a bug
        raise _hub_error(e, f"cannot download {ref}", ref, secret) from None
    commit = local.name  # snapshots/<commit hash>
    if not any(local.rglob("*.safetensors")):
        raise SurgeryError(
            f"{ref} (commit {commit[:12]}) has no .safetensors weights; surgery never loads "
            f"pickle checkpoints ({', '.join(PICKLE_SUFFIXES[:3])}). Use a revision that has "
            "safetensors (the Hub's safetensors conversion bot opens refs/pr/N branches) or "
            "convert it yourself with save_pretrained(..., safe_serialization=True)"
        )
    logger.info("using %s at commit %s from %s", repo_id, commit, local)
    return local, commit


@dataclass(frozen=True)
class RemoteHeaders:
    """Safetensors headers of a Hub checkpoint, read with HTTP range requests (no weights).

    ``tensors`` is in disk order (file, offset); each :class:`TensorInfo` ``file`` is the path of
    the shard inside the repo.
    """

    repo_id: str
    revision: str  # resolved commit hash
    files: tuple[Path, ...]  # shard paths inside the repo
    tensors: dict[str, TensorInfo]
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    # The read-only part of Checkpoint's interface, so `inspect` can take either.
    @property
    def source(self) -> str:
        return self.repo_id

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    def __len__(self) -> int:
        return len(self.tensors)

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise SurgeryError(f"tensor {name!r} not found in {self.repo_id}") from None

    def is_conv1d(self, name: str) -> bool:
        """True for a GPT-2 ``Conv1D`` weight (same rule as ``Checkpoint.is_conv1d``)."""
        from .checkpoint import is_conv1d

        return is_conv1d(name, self.info(name).shape, self.model_type)


def _weight_files(siblings: list[str], index: dict[str, Any] | None) -> list[str]:
    """Which safetensors files make up the checkpoint (same rules as ``Checkpoint.open``)."""
    if index is not None:
        return sorted(set(index.get("weight_map", {}).values()))
    if "model.safetensors" in siblings:
        return ["model.safetensors"]
    root = sorted(s for s in siblings if "/" not in s and s.endswith(".safetensors"))
    # A PEFT repo holds only adapter_model.safetensors: show it rather than nothing.
    return [s for s in root if s != "adapter_model.safetensors"] or root


def remote_headers(
    repo_id: str, revision: str | None = None, *, token: str | None = None
) -> RemoteHeaders:
    """Read a Hub checkpoint's tensor names, shapes and dtypes without downloading its weights.

    Each safetensors header is fetched with an HTTP range request
    (``HfApi.parse_safetensors_file_metadata``); ``config.json`` and the shard index, both small,
    are downloaded. Offline (``HF_HUB_OFFLINE=1``) the headers are read from the cached snapshot.

    Args:
        repo_id: ``org/name``.
        revision: branch, tag or commit; ``None`` for the default branch.
        token: overrides ``HF_TOKEN`` / the saved login.

    Returns:
        A :class:`RemoteHeaders`.

    Raises:
        SurgeryError: as :func:`download`, or when the repo holds no safetensors files.
    """
    from huggingface_hub import HfApi, hf_hub_download

    if is_offline():
        from .checkpoint import Checkpoint

        ckpt = Checkpoint.open(f"{repo_id}@{revision}" if revision else repo_id)
        return RemoteHeaders(
            repo_id,
            ckpt.revision or "",
            tuple(f.relative_to(ckpt.root) for f in ckpt.files),
            {n: ckpt.info(n) for n in ckpt.names()},
            dict(ckpt.metadata),
            dict(ckpt.config),
        )
    ref = _repo_ref(repo_id, revision)
    auth = _auth(token)
    secret = auth if isinstance(auth, str) else None  # scrubbed from any message
    api = HfApi(endpoint=endpoint(), token=auth, library_name="surgery")
    try:
        info = api.repo_info(repo_id, revision=revision)
        commit = info.sha or ""
        siblings = [s.rfilename for s in info.siblings or []]

        def fetch_json(name: str) -> dict[str, Any] | None:
            if name not in siblings:
                return None
            path = hf_hub_download(
                repo_id,
                name,
                revision=commit,
                endpoint=endpoint(),
                cache_dir=_cache_dir(),
                token=auth,
            )
            return json.loads(Path(path).read_text())

        index = fetch_json("model.safetensors.index.json")
        files = _weight_files(siblings, index)
        if not files:
            raise SurgeryError(
                f"{ref} has no .safetensors files (it lists "
                f"{', '.join(siblings[:8]) or 'nothing'}); surgery reads only "
                "safetensors checkpoints"
            )
        tensors: dict[str, TensorInfo] = {}
        metadata: dict[str, dict[str, str]] = {}
        for name in files:
            meta = api.parse_safetensors_file_metadata(repo_id, name, revision=commit)
            metadata[name] = dict(meta.metadata or {})
            # Disk order inside a file is the order of the data offsets.
            for tname, t in sorted(meta.tensors.items(), key=lambda kv: kv[1].data_offsets[0]):
                tensors[tname] = TensorInfo(
                    tname,
                    tuple(int(d) for d in t.shape),
                    t.dtype,
                    Path(name),
                    (int(t.data_offsets[0]), int(t.data_offsets[1])),
                )
        config = fetch_json("config.json") or fetch_json("adapter_config.json") or {}
    except SurgeryError:
        raise
    except Exception as e:  # noqa: BLE001 - mapped to SurgeryError or re-raised as a bug
        from huggingface_hub import errors as hf

        if isinstance(e, hf.SafetensorsParsingError):
            raise SurgeryError(f"{ref}: corrupt safetensors header ({e})") from None
        raise _hub_error(e, f"cannot read headers of {ref}", ref, secret) from None
    return RemoteHeaders(repo_id, commit, tuple(Path(f) for f in files), tensors, metadata, config)


def remote_source(src: str) -> RemoteHeaders | None:
    """Remote headers for ``src`` when it is a Hub id (not a local path) and we are online.

    ``inspect`` uses this to describe a Hub checkpoint without downloading its weights; ``None``
    means "open it as a local path (or from the offline cache) instead".
    """
    if Path(src).expanduser().exists() or src.startswith((".", "/", "~")) or is_offline():
        return None
    if not HUB_ID.match(src):
        return None
    repo, _, rev = src.partition("@")
    return remote_headers(repo, rev or None)


# -- out: pushes --------------------------------------------------------------------------------
def commit_text(manifest: dict[str, Any]) -> tuple[str, str]:
    """Commit summary and description saying what was done, from a ``surgery.json`` dict.

    Example summary: ``surgery merge (pcb): org/a + org/b onto org/base``.
    """
    verb = manifest.get("verb") or "edit"
    method = manifest.get("method")
    inputs = [i for i in manifest.get("inputs") or [] if isinstance(i, dict)]

    def label(i: dict[str, Any]) -> str:
        hub_id = i.get("hub_id")
        src = str(hub_id or i.get("source") or "?")
        # Local paths can be private (home folders): keep the last component only.
        return src if hub_id else Path(src.rstrip("/")).name or src

    bases = [label(i) for i in inputs if i.get("role") in ("base", "new_base")]
    others = [label(i) for i in inputs if i.get("role") not in ("base", "new_base")]
    summary = f"surgery {verb}" + (f" ({method})" if method else "")
    if others:
        summary += ": " + " + ".join(others)
    if bases:
        summary += (" onto " if others else ": ") + " + ".join(bases)
    if len(summary) > 200:
        summary = summary[:197] + "..."
    lines = []
    params = manifest.get("params") or {}
    if params:
        lines.append("params: " + ", ".join(f"{k}={v}" for k, v in sorted(params.items())))
    for key in ("seed", "device", "surgery_version"):
        if manifest.get(key) is not None:
            lines.append(f"{key}: {manifest[key]}")
    for i in inputs:
        if i.get("revision"):
            lines.append(f"{i.get('role', 'input')}: {label(i)} @ {i['revision']}")
    return summary, "\n".join(lines)


def _folder_files(folder: Path) -> list[str]:
    """Files to upload, as POSIX paths relative to ``folder``; hidden files/folders stay local."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out.append(rel.as_posix())
    return out


def _saved_token() -> str | None:
    """``HF_TOKEN``, else the saved login, looked up now (huggingface_hub fixed its path at import).

    ``HF_TOKEN_PATH`` / ``HF_HOME`` set after import move the saved login, as they would for a
    fresh process; an OIDC setup or the default location goes through ``huggingface_hub``.
    """
    from huggingface_hub import get_token

    if os.environ.get("HF_OIDC_RESOURCE"):
        return get_token()
    env = (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or "").strip()
    if env:
        return env
    path = os.environ.get("HF_TOKEN_PATH")
    if not path and os.environ.get("HF_HOME"):
        path = os.path.join(os.environ["HF_HOME"], "token")
    if path:
        try:
            return Path(path).expanduser().read_text().strip() or None
        except OSError:
            return None
    return get_token()


def _auth(token: str | None) -> str | bool:
    """The token to send: the given one, else ``_saved_token()``, else ``False`` (anonymous)."""
    return token or _saved_token() or False


def _token_in_files(folder: Path, token: str) -> list[str]:
    """Text files (not weights) in ``folder`` that contain ``token``: refuse to publish them."""
    found = []
    needle = token.encode()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix != ".safetensors" and p.stat().st_size < 64 * 2**20:
            if needle in p.read_bytes():
                found.append(str(p.relative_to(folder)))
    return found


def _push_problems(repo_id: str, token: str | None) -> list[str]:
    """Everything wrong with a push that can be known without the network."""
    problems = []
    if not HUB_ID.match(repo_id) and not HUB_ID.match(f"user/{repo_id}") or "@" in repo_id:
        problems.append(
            f"{repo_id!r} is not a Hub repo id; expected org/name (use --revision for a branch)"
        )
    if is_offline():
        problems.append("HF_HUB_OFFLINE=1 is set and pushing needs the network; unset it")
    if not (token or _saved_token()):
        problems.append(f"no Hugging Face token found: {LOGIN_HINT}")
    return problems


def check_push(repo_id: str, *, token: str | None = None) -> None:
    """Fail fast, before a long run, when a later ``--push`` could not work (no network used).

    Raises:
        SurgeryError: a malformed repo id, offline mode, or no token.
    """
    problems = _push_problems(repo_id, token)
    if problems:
        raise SurgeryError(f"--push {repo_id} cannot work:\n  - " + "\n  - ".join(problems))


def push(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
) -> str:
    """Upload an output folder to a Hub model repo in one commit.

    Creates the repo if needed (``exist_ok``) and the branch ``revision`` if it does not exist,
    then uploads the folder in one commit. The commit message comes from the folder's
    ``surgery.json`` unless given.

    Args:
        folder: the output folder (weights, configs, ``README.md``, ``surgery.json``).
        repo_id: ``org/name`` (or ``name``, under the token's user).
        token: a Hub token; default ``HF_TOKEN``, then the saved login. Never printed or written.
        private: create the repo private (an existing repo keeps its visibility).
        revision: branch to commit to (created from the default branch when missing).
        create_pr: open a pull request (against ``revision``, default the main branch) instead of
            committing to the branch.
        commit_message: the commit summary; default from ``surgery.json``.

    Returns:
        The URL of the commit, or of the pull request with ``create_pr``.

    Raises:
        SurgeryError: a missing/empty folder, offline mode, no token or a rejected one, no write
            access, invalid card metadata, or no network; checked before any upload.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    path = Path(folder)
    problems = _push_problems(repo_id, token)
    if not path.is_dir():
        problems.insert(0, f"{path}: no such folder")
    elif not _folder_files(path):
        problems.insert(0, f"{path}: the folder has no files to upload")
    tok = token or _saved_token()
    if tok and path.is_dir():
        leaked = _token_in_files(path, tok)
        if leaked:
            problems.append(
                f"{', '.join(leaked)} in {path} contain(s) your Hub token; remove it before pushing"
            )
    if problems:
        raise SurgeryError(f"cannot push {path} to {repo_id}:\n  - " + "\n  - ".join(problems))

    summary, description = "", ""
    manifest_path = path / "surgery.json"
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
            summary, description = commit_text(manifest)
        except (ValueError, TypeError, AttributeError):
            logger.warning(
                "%s is not a valid manifest; using a generic commit message", manifest_path
            )
        else:
            if not (path / "README.md").exists():
                # A folder from an older run (or hand-made): give the Hub its model card.
                from .card import write_card

                write_card(path, manifest)
    summary = commit_message or summary or f"Upload {path.name} with surgery"

    api = HfApi(endpoint=endpoint(), token=tok, library_name="surgery")
    ref = _repo_ref(repo_id, revision)
    try:
        user = api.whoami()["name"]  # fails fast on a bad token, before any write
        if "/" not in repo_id:
            repo_id = f"{user}/{repo_id}"
            ref = _repo_ref(repo_id, revision)
        logger.info("pushing %s to %s as %s", path, ref, user)
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        # create_commit, not upload_folder: upload_folder may split a folder into several
        # commits; one commit keeps a push atomic (all of the folder or nothing).
        info = api.create_commit(
            repo_id=repo_id,
            operations=[
                CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path / rel))
                for rel in _folder_files(path)
            ],
            commit_message=summary,
            commit_description=description or None,
            revision=revision,
            create_pr=create_pr,
        )
    except Exception as e:  # noqa: BLE001 - mapped to SurgeryError or re-raised as a bug
        from huggingface_hub import errors as hf

        if isinstance(e, ValueError) and not isinstance(
            e, (hf.HFValidationError, hf.HfHubHTTPError)
        ):
            # upload_folder validates README.md's metadata with the Hub before uploading.
            err = SurgeryError(
                f"cannot push {path} to {ref}: the model card README.md was rejected by "
                f"the Hub: {' '.join(_scrub(str(e), tok).split())}; fix its front matter"
            )
        else:
            err = _hub_error(e, f"cannot push {path} to {ref}", ref, tok)
        # A commit is atomic: nothing of this folder is on the Hub yet, so a retry is safe.
        raise SurgeryError(
            f"{err} (nothing was uploaded; retry with: surgery push {path} {repo_id})"
        ) from None
    url = info.pr_url if create_pr and info.pr_url else info.commit_url
    logger.info("pushed %s", url)
    return str(url)
