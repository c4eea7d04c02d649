"""A real HTTP server on 127.0.0.1 that speaks the subset of the Hugging Face Hub API we use.

``huggingface_hub`` ships no mock server and its HTTP client (``httpx2``) is not intercepted by the
usual transport mocks, so the tests run the real client against this stdlib server instead
(``HF_ENDPOINT=<url>`` for a subprocess, or ``endpoint=<url>`` in-process). Repositories live in
memory: every repo has branches pointing at immutable commits, each commit a full ``{path: bytes}``
snapshot. Endpoints (the ones ``huggingface_hub`` 2.x calls, checked against the installed source):

==================================================  ============================================
``GET  /api/whoami-v2``                             Bearer token → user; 401 on a bad token
``POST /api/repos/create``                          201, or 409 when the repo exists
``POST /api/validate-yaml``                         model-card front matter checks (Hub rules)
``GET  /api/models/{repo}[/revision/{rev}]``        repo info: ``sha``, ``siblings``
``GET  /api/models/{repo}/tree/{rev}[/{path}]``     tree listing (``recursive``)
``GET  /api/models/{repo}/refs``                    branches
``POST /api/models/{repo}/paths-info/{rev}``        per-path entries
``POST /api/models/{repo}/preupload/{rev}``         every file ``regular`` (inline upload)
``POST /api/models/{repo}/commit/{rev}``            NDJSON commit, ``?create_pr=1`` opens a PR
``POST /api/models/{repo}/branch/{branch}``         create a branch (409 when it exists)
``POST /api/models/{repo}/discussions``             open a pull request (``refs/pr/N``)
``GET  /api/models/{repo}/discussions/{num}``       pull request details
``HEAD|GET /{repo}/resolve/{rev}/{path}``           file download: ETag, X-Repo-Commit, Range
==================================================  ============================================

Errors carry the ``X-Error-Code`` headers the client maps to its exception types
(``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``, ``GatedRepo``). Every request is
recorded in :attr:`FakeHub.requests` (method, path, whether it carried a token (never the token
itself), the Range header), and any endpoint not listed above is answered 404 and recorded in
:attr:`FakeHub.unknown` so that a test can assert the client needed nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

__all__ = ["FakeHub", "Repo", "Commit", "git_blob_oid"]

RELATIONS = ("adapter", "merge", "quantized", "finetune")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}/[\w.\-]{1,96}$")


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1 the Hub reports as a regular file's ``oid`` and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    files: dict[str, bytes]
    summary: str
    description: str
    parent: str | None


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # name (or refs/pr/N) → commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    prs: list[dict[str, Any]] = field(default_factory=list)
    allowed_users: set[str] = field(default_factory=set)  # users who accepted a gated repo's terms

    def resolve(self, rev: str) -> Commit | None:
        """Branch name, ``refs/pr/N``, or a (full) commit oid → commit."""
        if rev in self.branches:
            return self.commits[self.branches[rev]]
        return self.commits.get(rev)


class FakeHub:
    """In-memory Hub served over real HTTP on ``127.0.0.1`` (a free port).

    Args:
        tokens: ``{token: user name}`` accepted as ``Authorization: Bearer <token>``.
        orgs: ``{user: [org, ...]}`` namespaces a user may write to besides their own.

    Use as a context manager; :attr:`url` is the endpoint to give the client.
    """

    def __init__(self, tokens: dict[str, str], orgs: dict[str, list[str]] | None = None):
        self.tokens = dict(tokens)
        self.orgs = {k: list(v) for k, v in (orgs or {}).items()}
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, bool, str | None]] = []  # method, path, auth?, Range
        self.unknown: list[tuple[str, str]] = []
        self.validated: list[str] = []  # card texts POSTed to /api/validate-yaml
        self.lock = threading.RLock()
        self._counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> FakeHub:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None, "use FakeHub as a context manager"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- state helpers (tests seed repos directly, without HTTP) -------------------------------
    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes] | Path,
        *,
        branch: str = "main",
        private: bool = False,
        gated: bool = False,
        message: str = "initial commit",
    ) -> str:
        """Create ``repo_id`` if needed and commit ``files`` (a dict or a folder) to ``branch``.

        Returns:
            The new commit oid.
        """
        if isinstance(files, Path):
            files = {
                p.relative_to(files).as_posix(): p.read_bytes()
                for p in sorted(files.rglob("*"))
                if p.is_file()
            }
        with self.lock:
            repo = self.repos.get(repo_id)
            if repo is None:
                repo = self.repos[repo_id] = Repo(repo_id, private=private, gated=gated)
            parent = repo.branches.get(branch)
            return self._commit(repo, branch, dict(files), message, "", parent)

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``rev`` (branch, ``refs/pr/N`` or commit oid)."""
        commit = self.repos[repo_id].resolve(rev)
        assert commit is not None, f"{repo_id}@{rev} does not exist"
        return commit.files

    def commit(self, repo_id: str, rev: str = "main") -> Commit:
        commit = self.repos[repo_id].resolve(rev)
        assert commit is not None, f"{repo_id}@{rev} does not exist"
        return commit

    def _commit(
        self,
        repo: Repo,
        branch: str,
        files: dict[str, bytes],
        summary: str,
        desc: str,
        parent: str | None,
    ) -> str:
        self._counter += 1
        digest = hashlib.sha1(f"{repo.repo_id}\0{parent}\0{summary}\0{self._counter}".encode())
        for path in sorted(files):
            digest.update(path.encode() + git_blob_oid(files[path]).encode())
        oid = digest.hexdigest()
        repo.commits[oid] = Commit(oid, files, summary, desc, parent)
        repo.branches[branch] = oid
        return oid

    def user_for(self, auth: str | None) -> str | None:
        if not auth or not auth.startswith("Bearer "):
            return None
        return self.tokens.get(auth[len("Bearer ") :].strip())

    def can_write(self, user: str | None, repo_id: str) -> bool:
        ns = repo_id.split("/", 1)[0]
        return user is not None and (ns == user or ns in self.orgs.get(user, []))


class _Reply(Exception):
    """Raised inside a handler to send an error response."""

    def __init__(
        self, status: int, message: str, code: str | None = None, extra: dict | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as the real Hub; every reply sets Content-Length

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # keep test output clean

    # -- plumbing ------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(
        self,
        status: int,
        body: bytes | dict | list = b"",
        headers: dict[str, str] | None = None,
        head: bool = False,
    ) -> None:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _dispatch(self, method: str) -> None:
        hub = self.hub
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        auth = self.headers.get("Authorization")
        with hub.lock:
            hub.requests.append((method, path, auth is not None, self.headers.get("Range")))
        body = self._body() if method == "POST" else b""
        try:
            # A token that the Hub does not know is refused everywhere, as on the real Hub.
            if auth and hub.user_for(auth) is None:
                raise _Reply(401, "Invalid credentials in Authorization header")
            user = hub.user_for(auth)
            with hub.lock:
                self._route(method, path, query, body, user)
        except _Reply as r:
            headers = {"X-Error-Message": r.message}
            if r.code:
                headers["X-Error-Code"] = r.code
            self._send(r.status, {"error": r.message, **r.extra}, headers, head=method == "HEAD")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # -- routing -------------------------------------------------------------------------------
    def _route(
        self, method: str, path: str, query: dict[str, list[str]], body: bytes, user: str | None
    ) -> None:
        hub = self.hub
        if path == "/api/whoami-v2" and method == "GET":
            if user is None:
                raise _Reply(401, "Invalid credentials in Authorization header")
            orgs = [{"name": o, "type": "org"} for o in hub.orgs.get(user, [])]
            return self._send(200, {
                "type": "user", "name": user, "fullname": user, "orgs": orgs,
                "auth": {"type": "access_token",
                         "accessToken": {"displayName": "tests", "role": "write"}},
            })  # fmt: skip
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(json.loads(body or b"{}"), user)
        if path == "/api/validate-yaml" and method == "POST":
            return self._validate_yaml(json.loads(body or b"{}"))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(.*))?", path)
        if m:
            return self._api_model(method, m.group(1), m.group(2) or "", query, body, user)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m and method in ("GET", "HEAD"):
            return self._resolve(method, m.group(1), unquote(m.group(2)), unquote(m.group(3)), user)
        hub.unknown.append((method, path))
        raise _Reply(404, f"unknown endpoint {method} {path}")

    def _repo(self, repo_id: str, user: str | None, *, write: bool = False) -> Repo:
        repo = self.hub.repos.get(repo_id)
        # The Hub answers 401 RepoNotFound both for a missing repo and a private repo without
        # access, so that existence does not leak.
        if repo is None or (repo.private and not self.hub.can_write(user, repo_id)):
            raise _Reply(401, "Repository not found", "RepoNotFound")
        if write and not self.hub.can_write(user, repo_id):
            raise _Reply(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _commit_for(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise _Reply(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    def _create_repo(self, payload: dict[str, Any], user: str | None) -> None:
        if user is None:
            raise _Reply(401, "You must be authenticated to create a repo")
        ns = payload.get("organization") or user
        repo_id = f"{ns}/{payload.get('name')}"
        if payload.get("type", "model") not in ("model", None):
            raise _Reply(400, "only model repos are served here")
        if not REPO_ID.match(repo_id):
            raise _Reply(400, f"invalid repo name {repo_id!r}")
        if not self.hub.can_write(user, repo_id):
            raise _Reply(403, f"You don't have the rights to create a model under {ns}")
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            raise _Reply(409, "You already created this model repo", extra={"url": url})
        # huggingface_hub >= 1.x sends "visibility"; older clients send "private".
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = self.hub.repos[repo_id] = Repo(repo_id, private=private)
        # A new Hub repo has one commit holding a .gitattributes file.
        self.hub._commit(
            repo,
            "main",
            {".gitattributes": b"*.safetensors filter=lfs\n"},
            "initial commit",
            "",
            None,
        )
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload: dict[str, Any]) -> None:
        """Apply the Hub's model-card metadata rules that matter for our cards."""
        content = payload.get("content", "")
        self.hub.validated.append(content)
        errors: list[str] = []
        m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
        meta: Any = {}
        if m:
            try:
                meta = yaml.safe_load(m.group(1)) or {}
            except yaml.YAMLError as e:
                errors.append(f"invalid YAML: {e}")
            if not isinstance(meta, dict):
                errors.append("metadata must be a YAML mapping")
                meta = {}
        base = meta.get("base_model")
        bases = [base] if isinstance(base, str) else base
        if base is not None:
            if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
                errors.append('"base_model" must be a string or a list of strings')
            else:
                errors += [
                    f'"base_model" {b!r} is not a valid model id'
                    for b in bases
                    if not REPO_ID.match(b)
                ]
        rel = meta.get("base_model_relation")
        if rel is not None:
            if rel not in RELATIONS:
                errors.append(f'"base_model_relation" must be one of {", ".join(RELATIONS)}')
            if not base:
                errors.append('"base_model_relation" needs "base_model"')
        for key in ("tags", "datasets", "language"):
            v = meta.get(key)
            if v is not None and not (isinstance(v, list) and all(isinstance(t, str) for t in v)):
                errors.append(f'"{key}" must be a list of strings')
        for key in ("library_name", "license", "pipeline_tag"):
            if meta.get(key) is not None and not isinstance(meta[key], str):
                errors.append(f'"{key}" must be a string')
        if errors:
            return self._send(400, {"errors": [{"message": e} for e in errors], "warnings": []})
        self._send(200, {"errors": [], "warnings": []})

    # -- /api/models/{repo}/... ----------------------------------------------------------------
    def _api_model(
        self,
        method: str,
        repo_id: str,
        rest: str,
        query: dict[str, list[str]],
        body: bytes,
        user: str | None,
    ) -> None:
        hub = self.hub
        if rest == "" or rest.startswith("revision/"):
            repo = self._repo(repo_id, user)
            rev = unquote(rest[len("revision/") :]) if rest else "main"
            commit = self._commit_for(repo, rev)
            gated = "auto" if repo.gated else False
            return self._send(200, {
                "_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
                "sha": commit.oid, "private": repo.private, "gated": gated,
                "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
                "siblings": [{"rfilename": p} for p in sorted(commit.files)],
            })  # fmt: skip
        if rest.startswith("tree/"):
            repo = self._repo(repo_id, user)
            rev, _, sub = rest[len("tree/") :].partition("/")
            commit = self._commit_for(repo, unquote(rev))
            return self._send(
                200,
                _tree(commit.files, unquote(sub), query.get("recursive", ["false"])[0] == "true"),
            )
        if rest == "refs":
            repo = self._repo(repo_id, user)
            branches = [
                {"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid}
                for b, oid in repo.branches.items()
                if not b.startswith("refs/")
            ]
            return self._send(200, {"branches": branches, "tags": [], "converts": []})
        if rest.startswith("paths-info/") and method == "POST":
            repo = self._repo(repo_id, user)
            commit = self._commit_for(repo, unquote(rest[len("paths-info/") :]))
            form = parse_qs(body.decode())
            paths = form.get("paths", [])
            if not paths and body.startswith(b"{"):
                paths = json.loads(body).get("paths", [])
            entries = [e for e in _tree(commit.files, "", True) if e["path"] in paths]
            return self._send(200, entries)
        if rest == "discussions" and method == "POST":
            # huggingface_hub's pipelined upload opens the PR first, then commits to refs/pr/N.
            repo = self._repo(repo_id, user)
            if user is None:
                raise _Reply(401, "You must be authenticated to open a discussion")
            payload = json.loads(body or b"{}")
            num = len(repo.prs) + 1
            pr = payload.get("pullRequest", False)
            repo.prs.append({"num": num, "title": payload.get("title", ""), "target": "main",
                             "author": user, "pull_request": pr})  # fmt: skip
            if pr:
                repo.branches[f"refs/pr/{num}"] = repo.branches["main"]
            return self._send(200, {"num": num, "pullRequest": pr,
                                    "url": f"{hub.url}/{repo_id}/discussions/{num}"})  # fmt: skip
        m = re.fullmatch(r"discussions/(\d+)", rest)
        if m and method == "GET":
            repo = self._repo(repo_id, user)
            num = int(m.group(1))
            if not 0 < num <= len(repo.prs):
                raise _Reply(404, f"Discussion {num} not found")
            d = repo.prs[num - 1]
            return self._send(200, {
                "num": num, "title": d["title"], "status": "open",
                "author": {"name": d.get("author", "deleted")},
                "createdAt": "2026-01-01T00:00:00.000Z",
                "repo": {"name": repo_id, "type": "model"},
                "isPullRequest": d.get("pull_request", True), "events": [],
                "changes": {"base": f"refs/heads/{d['target']}"}, "filesWithConflicts": [],
                "diff": "",
            })  # fmt: skip
        if rest.startswith("branch/") and method == "POST":
            repo = self._repo(repo_id, user, write=True)
            branch = unquote(rest[len("branch/") :])
            if branch.startswith("refs/"):
                raise _Reply(400, f"Invalid reference for a branch: {branch}")
            if branch in repo.branches:
                raise _Reply(409, f"Reference already exists: {branch}")
            start = json.loads(body or b"{}").get("startingPoint") or "main"
            repo.branches[branch] = self._commit_for(repo, start).oid
            return self._send(200, {})
        if rest.startswith("preupload/") and method == "POST":
            repo = self._repo(repo_id, user, write=True)
            self._commit_for(repo, unquote(rest[len("preupload/") :]))
            files = json.loads(body)["files"]
            # "regular" for every file: contents travel inline in the commit, no LFS/Xet.
            return self._send(200, {
                "files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                           "oid": None} for f in files],
            })  # fmt: skip
        if rest.startswith("commit/") and method == "POST":
            repo = self._repo(repo_id, user, write=True)
            return self._ndjson_commit(repo, unquote(rest[len("commit/") :]), query, body)
        hub.unknown.append((method, f"/api/models/{repo_id}/{rest}"))
        raise _Reply(404, f"unknown endpoint {method} /api/models/{repo_id}/{rest}")

    def _ndjson_commit(
        self, repo: Repo, rev: str, query: dict[str, list[str]], body: bytes
    ) -> None:
        hub = self.hub
        base = self._commit_for(repo, rev)
        header: dict[str, Any] = {}
        files = dict(base.files)
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise _Reply(400, f"unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            else:  # lfsFile/deletedFolder/...: never requested, since preupload says "regular"
                raise _Reply(400, f"unsupported commit operation {key!r}")
        parent = header.get("parentCommit")
        if parent and parent != base.oid:
            raise _Reply(412, "A commit has happened since. Please refresh and try again.")
        summary = header.get("summary") or ""
        if not summary:
            raise _Reply(400, "commit summary must not be empty")
        reply: dict[str, Any] = {}
        if query.get("create_pr", ["0"])[0] in ("1", "true"):
            num = len(repo.prs) + 1
            branch = f"refs/pr/{num}"
            repo.prs.append({"num": num, "title": summary, "target": rev, "pull_request": True})
            reply["pullRequestUrl"] = f"{hub.url}/{repo.repo_id}/discussions/{num}"
        else:
            branch = rev if rev in repo.branches else None
            if branch is None:  # committing on a commit oid is not allowed
                raise _Reply(400, f"Invalid rev id: {rev} is not a branch")
        oid = hub._commit(repo, branch, files, summary, header.get("description") or "", base.oid)
        reply.update(
            commitUrl=f"{hub.url}/{repo.repo_id}/commit/{oid}", commitOid=oid, success=True
        )
        self._send(200, reply)

    # -- /{repo}/resolve/{rev}/{path} ----------------------------------------------------------
    def _resolve(self, method: str, repo_id: str, rev: str, path: str, user: str | None) -> None:
        repo = self._repo(repo_id, user)
        if repo.gated and user not in repo.allowed_users:
            raise _Reply(
                403 if user else 401,
                f"Access to model {repo_id} is restricted. You must have access to it "
                "and be authenticated to access it.",
                "GatedRepo",
            )
        commit = self._commit_for(repo, rev)
        if path not in commit.files:
            raise _Reply(404, "Entry not found", "EntryNotFound")
        data = commit.files[path]
        headers = {
            "ETag": f'"{git_blob_oid(data)}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        rng = self.headers.get("Range") or self.headers.get("range")
        status = 200
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not m:
                raise _Reply(416, f"bad range {rng}")
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
            if start >= len(data) and len(data) > 0:
                raise _Reply(416, "Range Not Satisfiable")
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        if method == "HEAD":
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return
        self._send(status, data, headers)


def _tree(files: dict[str, bytes], sub: str, recursive: bool) -> list[dict[str, Any]]:
    """Tree entries under ``sub`` (files and folders), as ``/tree`` returns them."""
    prefix = f"{sub.strip('/')}/" if sub.strip("/") else ""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(files):
        if not path.startswith(prefix):
            continue
        rel = path[len(prefix) :]
        parts = rel.split("/")
        # Folders along the way are listed as directory entries.
        for i in range(1, len(parts)):
            if not recursive and i > 1:
                break
            d = prefix + "/".join(parts[:i])
            out.setdefault(
                d,
                {
                    "type": "directory",
                    "oid": hashlib.sha1(d.encode()).hexdigest(),
                    "size": 0,
                    "path": d,
                },
            )
        if recursive or len(parts) == 1:
            data = files[path]
            out[path] = {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": path}
    return list(out.values())
