"""A test double of the Hugging Face Hub's HTTP routes, served on 127.0.0.1.

It lets tests push and pull through ``huggingface_hub``'s *own* HTTP client, offline, end to
end. It is a double, not a Hub: repositories live in memory, commits are linear per branch,
every file is stored as a regular git blob (the preupload route answers ``"regular"``, so the
client sends file contents base64-encoded inside the NDJSON commit payload and never takes
the LFS / Xet paths), and only the routes ``huggingface_hub`` 2.x calls for the operations
below exist:

==========================================================  ==========================================
route                                                       used by
==========================================================  ==========================================
``POST /api/repos/create``                                  ``create_repo``
``POST /api/validate-yaml``                                 ``create_commit`` (README.md metadata check)
``POST /api/models/{repo}/preupload/{rev}``                 ``upload_folder`` / ``create_commit``
``POST /api/models/{repo}/commit/{rev}`` (NDJSON)           ``upload_folder`` / ``create_commit``
``POST /api/models/{repo}/branch/{branch}``                 ``create_branch`` (409 when it exists)
``GET  /api/models/{repo}[/revision/{rev}]``                ``repo_info``, ``resolve_revision``,
                                                            ``snapshot_download``
``GET  /api/models/{repo}/tree/{rev}[/{path}]``             ``list_repo_tree``, ``list_repo_files``,
                                                            ``snapshot_download``
``HEAD|GET /{repo}/resolve/{rev}/{path}``                   ``hf_hub_download`` (``ETag`` = git blob
                                                            sha1, ``X-Repo-Commit``, ``Content-Length``)
==========================================================  ==========================================

Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) so
the client raises its usual exception types. Write routes require an ``Authorization: Bearer``
header. Request bodies are bounded (``max_body_bytes``), the server is single-process,
threaded, bound to 127.0.0.1 on a free port, and stopped by :meth:`HubDouble.stop` (the
:func:`hub` fixture does it).

Use :func:`hub` (a pytest fixture) to get a running double with ``huggingface_hub`` pointed at
it: ``constants.ENDPOINT`` / ``HUGGINGFACE_CO_URL_TEMPLATE`` (what ``HF_ENDPOINT`` sets at
import), ``HF_HUB_OFFLINE`` off, a temporary ``HF_HOME`` / hub cache and a dummy token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

__all__ = ["HubDouble", "RepoState", "Commit", "git_blob_sha1", "hub", "TEST_TOKEN"]

#: The token the fixture makes ``huggingface_hub`` send (not a credential: the double accepts any).
TEST_TOKEN = "hf_bdgauge_test_double_token"

_REPO = r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)"
_ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/branch/(?P<branch>[^/]+)$"), "create_branch"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$"), "tree"),
    ("GET", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$"), "repo_info"),
    ("GET", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("HEAD", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
]


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as a regular file's ETag / oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, bytes]


@dataclass
class RepoState:
    repo_id: str
    private: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        if rev in self.refs:
            return self.commits[self.refs[rev]]
        return self.commits.get(rev)


class _HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HubDouble:
    """The in-memory Hub and its HTTP server (see the module docstring)."""

    def __init__(self, *, max_body_bytes: int = 64 * 1024 * 1024, require_token: bool = True) -> None:
        self.max_body_bytes = max_body_bytes
        self.require_token = require_token
        self.repos: dict[str, RepoState] = {}
        self.requests: list[tuple[str, str]] = []
        self.tokens_seen: set[str] = set()
        self._lock = threading.Lock()
        self._counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("the hub double is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubDouble:
        double = self

        class Handler(_Handler):
            hub = double

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.timeout = 5
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-double", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> HubDouble:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ inspection helpers
    def head(self, repo_id: str, branch: str = "main") -> str:
        """The commit a branch points to."""
        return self.repos[repo_id].refs[branch]

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        commit = self.repos[repo_id].resolve(rev)
        if commit is None:
            raise KeyError(rev)
        return dict(commit.files)

    def history(self, repo_id: str, branch: str = "main") -> list[str]:
        """Commit ids of a branch, newest first."""
        repo = self.repos[repo_id]
        out, oid = [], repo.refs.get(branch)
        while oid:
            out.append(oid)
            oid = repo.commits[oid].parent
        return out

    # ------------------------------------------------------------------ state changes
    def _new_oid(self, repo_id: str, message: str) -> str:
        self._counter += 1
        return hashlib.sha1(f"{repo_id}\0{message}\0{self._counter}\0{time.time_ns()}".encode()).hexdigest()

    def _commit(self, repo: RepoState, branch: str, message: str, files: dict[str, bytes]) -> Commit:
        parent = repo.refs.get(branch)
        c = Commit(self._new_oid(repo.repo_id, message), parent, message, files)
        repo.commits[c.oid] = c
        repo.refs[branch] = c.oid
        return c

    # ------------------------------------------------------------------ routes
    def create_repo(self, h: _Handler, m: re.Match, q: dict) -> tuple[int, Any]:
        body = h.json_body()
        name, org = body.get("name"), body.get("organization")
        if body.get("type") not in (None, "model"):
            raise _HttpError(400, "the hub double only hosts model repos")
        if not name:
            raise _HttpError(400, "missing repo name")
        repo_id = f"{org or 'user'}/{name}"
        with self._lock:
            if repo_id in self.repos:  # the Hub answers 409 with the url; create_repo(exist_ok=True) reads it
                return 409, {
                    "error": "You already created this model repo",
                    "url": f"{self.endpoint}/{repo_id}",
                }
            repo = RepoState(repo_id, private=body.get("visibility") == "private")
            self.repos[repo_id] = repo
            self._commit(
                repo,
                "main",
                "initial commit",
                {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
            )
        return 200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id, "id": repo_id}

    def validate_yaml(self, h: _Handler, m: re.Match, q: dict) -> tuple[int, Any]:
        import yaml

        content = h.json_body().get("content", "")
        errors = []
        if content.startswith("---"):
            parts = content.split("---", 2)
            if len(parts) < 3:
                errors.append({"message": "unterminated metadata block"})
            else:
                try:
                    meta = yaml.safe_load(parts[1]) or {}
                    if not isinstance(meta, dict):
                        errors.append({"message": "metadata must be a mapping"})
                except yaml.YAMLError as e:
                    errors.append({"message": f"invalid YAML: {e}"})
        return (400 if errors else 200), {"errors": errors, "warnings": []}

    def _repo(self, m: re.Match) -> RepoState:
        repo = self.repos.get(m.group("repo"))
        if repo is None:
            raise _HttpError(404, "Repository not found", "RepoNotFound")
        return repo

    def _rev(self, repo: RepoState, rev: str | None) -> Commit:
        c = repo.resolve(unquote(rev or "main"))
        if c is None:
            raise _HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return c

    def preupload(self, h: _Handler, m: re.Match, q: dict) -> tuple[int, Any]:
        h.require_auth()
        repo = self._repo(m)
        head = self._rev(repo, m.group("rev"))
        files = []
        for f in h.json_body().get("files", []):
            path = f["path"]
            existing = head.files.get(path)
            files.append(
                {
                    "path": path,
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha1(existing) if existing is not None else None,
                }
            )
        return 200, {"files": files, "commitOid": head.oid}

    def commit(self, h: _Handler, m: re.Match, q: dict) -> tuple[int, Any]:
        h.require_auth()
        if q.get("create_pr"):
            raise _HttpError(400, "the hub double does not implement pull requests")
        repo = self._repo(m)
        branch = unquote(m.group("rev"))
        lines = [json.loads(line) for line in h.body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HttpError(400, "the NDJSON commit payload must start with a header line")
        header = lines[0]["value"]
        with self._lock:
            if branch not in repo.refs:
                raise _HttpError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = repo.commits[repo.refs[branch]]
            parent = header.get("parentCommit")
            if parent is not None and parent != head.oid:
                raise _HttpError(412, f"A commit has happened since {parent}: the branch head is {head.oid}")
            files = dict(head.files)
            for op in lines[1:]:
                key, value = op.get("key"), op.get("value", {})
                path = value.get("path", "")
                if path.startswith("/") or ".." in path.split("/"):
                    raise _HttpError(400, f"invalid path {path!r}")
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise _HttpError(400, "file operations must be base64-encoded")
                    files[path] = base64.b64decode(value["content"], validate=True)
                elif key == "deletedFile":
                    if path not in files:
                        raise _HttpError(404, "A file with this name doesn't exist", "EntryNotFound")
                    del files[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    files = {p: b for p, b in files.items() if not p.startswith(prefix)}
                elif key == "lfsFile":
                    raise _HttpError(400, "the hub double stores every file as a regular blob (no LFS)")
                else:
                    raise _HttpError(400, f"unknown commit operation {key!r}")
            c = self._commit(repo, branch, header.get("summary") or "commit", files)
        return 200, {
            "commitUrl": f"{self.endpoint}/{repo.repo_id}/commit/{c.oid}",
            "commitOid": c.oid,
            "pullRequestUrl": None,
            "success": True,
        }

    def create_branch(self, h: _Handler, m: re.Match, q: dict) -> tuple[int, Any]:
        h.require_auth()
        repo = self._repo(m)
        branch = unquote(m.group("branch"))
        start = self._rev(repo, h.json_body().get("startingPoint") or "main")
        with self._lock:
            if branch in repo.refs:
                raise _HttpError(409, f"Reference already exists: {branch}")
            repo.refs[branch] = start.oid
        return 200, {}

    def repo_info(self, h: _Handler, m: re.Match, q: dict) -> tuple[int, Any]:
        repo = self._repo(m)
        c = self._rev(repo, m.group("rev"))
        return 200, {
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": c.oid,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "lastModified": "2024-01-01T00:00:00.000Z",
            "createdAt": "2024-01-01T00:00:00.000Z",
            "siblings": [
                {"rfilename": p, "size": len(b), "blobId": git_blob_sha1(b)}
                for p, b in sorted(c.files.items())
            ],
        }

    def tree(self, h: _Handler, m: re.Match, q: dict) -> tuple[int, Any]:
        repo = self._repo(m)
        c = self._rev(repo, m.group("rev"))
        base = unquote(m.group("path") or "").strip("/")
        prefix = base + "/" if base else ""
        recursive = q.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries: dict[str, dict[str, Any]] = {}
        for p, b in sorted(c.files.items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix) :]
            parts = rest.split("/")
            for i in range(1, len(parts)):
                folder = prefix + "/".join(parts[:i])
                if recursive or i == 1:
                    entries.setdefault(
                        folder,
                        {
                            "type": "directory",
                            "path": folder,
                            "oid": hashlib.sha1(folder.encode()).hexdigest(),
                            "size": 0,
                        },
                    )
            if recursive or len(parts) == 1:
                entries[p] = {"type": "file", "path": p, "oid": git_blob_sha1(b), "size": len(b)}
        if base and not entries:
            raise _HttpError(404, f"{base} does not exist", "EntryNotFound")
        return 200, [entries[k] for k in sorted(entries)]

    def resolve(self, h: _Handler, m: re.Match, q: dict) -> tuple[int, Any]:
        repo = self._repo(m)
        c = self._rev(repo, m.group("rev"))
        path = unquote(m.group("path"))
        data = c.files.get(path)
        if data is None:
            raise _HttpError(404, "Entry not found", "EntryNotFound")
        headers = {
            "ETag": f'"{git_blob_sha1(data)}"',
            "X-Repo-Commit": c.oid,
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "none",
        }
        return 200, _Raw(data, headers)


@dataclass
class _Raw:
    data: bytes
    headers: dict[str, str]


class _Handler(BaseHTTPRequestHandler):
    hub: HubDouble
    protocol_version = "HTTP/1.1"
    _body: bytes | None = None  # per request (one handler instance serves a whole keep-alive connection)

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def body(self) -> bytes:
        if self._body is None:
            n = int(self.headers.get("Content-Length") or 0)
            if n > self.hub.max_body_bytes:
                raise _HttpError(413, f"request body of {n} bytes exceeds the double's limit")
            self._body = self.rfile.read(n) if n else b""
        return self._body

    def json_body(self) -> dict[str, Any]:
        try:
            obj = json.loads(self.body() or b"{}")
        except ValueError as e:
            raise _HttpError(400, f"invalid JSON body: {e}") from None
        if not isinstance(obj, dict):
            raise _HttpError(400, "JSON body must be an object")
        return obj

    def require_auth(self) -> None:
        auth = self.headers.get("Authorization") or ""
        if auth.startswith("Bearer "):
            self.hub.tokens_seen.add(auth[len("Bearer ") :])
        elif self.hub.require_token:
            raise _HttpError(401, "Invalid credentials in Authorization header")

    def _dispatch(self, method: str) -> None:
        self._body = None
        url = urlsplit(self.path)
        q = parse_qs(url.query)
        self.hub.requests.append((method, url.path))
        status, payload = 404, {"error": f"no route {method} {url.path} in the hub double"}
        headers: dict[str, str] = {}
        try:
            for meth, rx, name in _ROUTES:
                if meth == method and (m := rx.match(url.path)):
                    status, payload = getattr(self.hub, name)(self, m, q)
                    break
            if method == "POST":
                self.body()  # drain what a route did not read, so the connection stays usable
        except _HttpError as e:
            self.close_connection = True  # the body may be unread: do not reuse the connection
            status, payload = e.status, {"error": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            headers["X-Error-Message"] = e.message
        except Exception as e:  # a bug in the double: report it as a 500 rather than hang the client
            self.close_connection = True
            status, payload = 500, {"error": f"hub double failure: {type(e).__name__}: {e}"}
        if isinstance(payload, _Raw):
            data, headers = payload.data, {**headers, **payload.headers}
        else:
            data = json.dumps(payload).encode()
            headers.setdefault("Content-Type", "application/json")
        if self.close_connection:
            headers["Connection"] = "close"
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubDouble]:
    """A running :class:`HubDouble` with ``huggingface_hub`` pointed at it (see module docstring)."""
    from huggingface_hub import constants

    home = tmp_path_factory.mktemp("hf_home")
    double = HubDouble().start()
    ep = double.endpoint
    monkeypatch.setenv("HF_ENDPOINT", ep)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub reads these environment variables once, at import: patch the module too.
    monkeypatch.setattr(constants, "ENDPOINT", ep)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", ep + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_XET_CACHE", str(home / "xet"))
    try:
        yield double
    finally:
        double.stop()
