"""A loopback stand-in for the Hugging Face Hub, enough for the real `huggingface_hub` client to
push (`create_repo`, `create_commit` / `upload_folder`) and pull (`snapshot_download`) offline.

    with HubServer(tmp_path / "hub") as hub:            # 127.0.0.1, an ephemeral port, a thread
        HfApi(endpoint=hub.url).create_repo("alice/m")
        hub.fail("commit", 500)                         # the next commits answer HTTP 500
        hub.tree("alice/m")                             # the files of the last commit, on disk

Routes (what huggingface_hub 2.4 calls; model repos only):
  POST /api/repos/create                        {"name", "organization", "visibility"} -> {"url"}
  POST /api/validate-yaml                       {"content"}: the README front matter is checked
  POST /api/models/{repo}/preupload/{rev}       every file "regular" (base64 in the commit), with
                                                the oid of the file already there (unchanged
                                                files are then left out by the client)
  POST /api/models/{repo}/commit/{rev}          NDJSON: header, file, deletedFile, deletedFolder;
                                                applied whole or not at all
  GET  /api/models/{repo}[/revision/{rev}]      model info: sha, siblings
  GET  /api/models/{repo}/tree/{rev}[/{path}]   the files (recursive)
  HEAD/GET /{repo}/resolve/{rev}/{path}         a file, with ETag / X-Repo-Commit
  GET  /api/agent-harnesses                     an empty registry (the client asks once a day)
Each commit is stored on disk as a full snapshot: ROOT/<owner>/<name>/<sha>/. Bounded: request
bodies over `max_body` bytes get 413, handlers time out after 30 s, and the server shuts itself
down after `lifetime` seconds. `token`: when set, every call must carry `Bearer <token>` (401
otherwise, as the Hub answers a bad token; validate-yaml stays public).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

TOKEN = "hf_test_token"  # what the tests' server accepts
REPO = r"(?P<repo>[\w.-]+(?:/[\w.-]+)?)"
ROUTES = [  # (method, route name, path pattern)
    ("POST", "create", r"/api/repos/create"),
    ("POST", "validate", r"/api/validate-yaml"),
    ("POST", "preupload", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)"),
    ("POST", "commit", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)"),
    ("GET", "tree", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?"),
    ("GET", "info", rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?"),
    ("GET", "resolve", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"),
    ("HEAD", "resolve", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"),
    ("GET", "harnesses", r"/api/agent-harnesses"),  # the client's best-effort agent registry
]
_COMPILED = [(m, name, re.compile(pattern + "$")) for m, name, pattern in ROUTES]


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def check_metadata(content: str) -> list[str]:
    """The Hub's README checks, as far as the tests need them: the front matter is a YAML
    mapping that JSON can hold, with well-typed standard keys."""
    match = re.match(r"^---\r?\n(.*?)\r?\n---(\r?\n|$)", content, re.S)
    if match is None:
        return []
    try:
        data = yaml.safe_load(match.group(1))
        json.dumps(data, allow_nan=False)
    except (yaml.YAMLError, ValueError, TypeError) as error:
        return [f"metadata is not valid YAML that JSON can hold: {error}"]
    if not isinstance(data, dict):
        return ["metadata must be a YAML mapping"]
    errors = []
    for key in ("library_name", "pipeline_tag", "license"):
        if key in data and not isinstance(data[key], str):
            errors.append(f'"{key}" must be a string')
    if "tags" in data and not (isinstance(data["tags"], list) and all(isinstance(t, str) for t in data["tags"])):
        errors.append('"tags" must be a list of strings')
    bases = data.get("base_model")
    for base in [bases] if isinstance(bases, str) else bases or []:
        if not (isinstance(base, str) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", base)):
            errors.append(f'"base_model" must name Hub models, got {base!r}')
    return errors


class HubServer:
    def __init__(
        self, root: str | Path, *, token: str | None = None, max_body: int = 256 << 20, lifetime: float = 300.0
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.token, self.max_body, self.lifetime = token, max_body, lifetime
        self.repos: dict[str, dict[str, Any]] = {}  # repo id -> {"private", "commits": [...], "main": sha}
        self.requests: list[dict[str, Any]] = []  # method, route, path, status, authorization
        self._failures: dict[str, tuple[int, int | None]] = {}  # route -> (status, times left or None)
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    # ------------------------------------------------------------------ lifecycle and test controls
    def start(self) -> HubServer:
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._timer.cancel()
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fail(self, route: str, status: int, times: int | None = None) -> None:
        """Make `route` ("create", "validate", "preupload", "commit", "info", "tree", "resolve")
        answer `status` (the next `times` calls, or until `clear_failures`)."""
        if route not in {name for _, name, _ in ROUTES}:
            raise ValueError(f"unknown route {route!r}")
        self._failures[route] = (status, times)

    def clear_failures(self) -> None:
        self._failures.clear()

    def commits(self, repo_id: str) -> list[dict[str, Any]]:
        """The commits of a repo, oldest first: sha, summary, files (paths of the whole tree)."""
        return list(self.repos[repo_id]["commits"])

    def tree(self, repo_id: str, revision: str = "main") -> Path:
        """The directory holding the repo's files at `revision` (a commit's full snapshot)."""
        return self.root / repo_id / self._resolve_rev(repo_id, revision)["sha"]

    # ------------------------------------------------------------------ handlers
    def _injected_failure(self, route: str) -> None:
        with self._lock:
            if route not in self._failures:
                return
            status, times = self._failures[route]
            if times is not None:
                self._failures[route] = (status, times - 1)
                if times <= 1:
                    del self._failures[route]
        message = "Invalid credentials in Authorization header" if status == 401 else f"simulated HTTP {status}"
        raise HubError(status, message)

    def _repo(self, repo_id: str) -> dict[str, Any]:
        if repo_id not in self.repos:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return self.repos[repo_id]

    def _resolve_rev(self, repo_id: str, revision: str | None) -> dict[str, Any]:
        repo = self._repo(repo_id)
        revision = revision or "main"
        sha = repo["main"] if revision == "main" else revision
        for commit in repo["commits"]:
            if commit["sha"] == sha:
                return commit
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _commit(self, repo_id: str, files: dict[str, bytes | None], summary: str) -> dict[str, Any]:
        """Apply a whole commit (None deletes a path) as a new snapshot, then move main to it."""
        repo = self.repos[repo_id]
        parent = self._resolve_rev(repo_id, "main") if repo["commits"] else None
        tree = {p: (self.root / repo_id / parent["sha"] / p).read_bytes() for p in parent["files"]} if parent else {}
        for path, data in files.items():
            if data is None:
                tree = {p: v for p, v in tree.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
            else:
                tree[path] = data
        digest = hashlib.sha1(f"{parent['sha'] if parent else ''}{summary}{time.time_ns()}".encode())
        for path in sorted(tree):
            digest.update(path.encode() + git_oid(tree[path]).encode())
        sha = digest.hexdigest()
        for path, data in tree.items():
            target = self.root / repo_id / sha / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        commit = {
            "sha": sha,
            "summary": summary,
            "files": sorted(tree),
            "oids": {p: git_oid(d) for p, d in tree.items()},
        }
        repo["commits"].append(commit)
        repo["main"] = sha
        return commit

    def create(self, body: dict[str, Any], **_: Any) -> tuple[int, Any]:
        name, org = body.get("name"), body.get("organization")
        repo_id = f"{org}/{name}" if org else str(name)
        with self._lock:
            if repo_id in self.repos:
                raise HubError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
            self.repos[repo_id] = {"private": body.get("visibility") == "private", "commits": [], "main": None}
            self._commit(
                repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "initial commit"
            )
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def validate(self, body: dict[str, Any], **_: Any) -> tuple[int, Any]:
        errors = check_metadata(str(body.get("content", "")))
        if errors:
            return 400, {"errors": [{"message": e} for e in errors], "warnings": []}
        return 200, {"errors": [], "warnings": []}

    def preupload(self, body: dict[str, Any], repo: str, rev: str, **_: Any) -> tuple[int, Any]:
        oids = self._resolve_rev(repo, unquote(rev))["oids"]
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oids.get(f["path"])}
            for f in body.get("files", [])
        ]
        return 200, {"files": files, "commitOid": self._repo(repo)["main"]}

    def commit(self, raw: bytes, repo: str, rev: str, **_: Any) -> tuple[int, Any]:
        if unquote(rev) != "main":
            raise HubError(400, "this test server commits to main only")
        lines = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line.get("key") == "header"), None)
        if header is None:
            raise HubError(400, "the commit has no header line")
        files: dict[str, bytes | None] = {}
        for line in lines:
            key, value = line.get("key"), line.get("value", {})
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                files[value["path"]] = None
            elif key != "header":
                raise HubError(400, f"this test server takes regular files only, got {key!r}")
        with self._lock:
            self._repo(repo)
            commit = self._commit(repo, files, header.get("summary", ""))
        url = f"{self.url}/{repo}/commit/{commit['sha']}"
        return 200, {"commitUrl": url, "commitOid": commit["sha"], "success": True, "pullRequestUrl": None}

    def info(self, repo: str, rev: str | None = None, **_: Any) -> tuple[int, Any]:
        commit = self._resolve_rev(repo, unquote(rev) if rev else None)
        siblings = [{"rfilename": p} for p in commit["files"]]
        data = {"id": repo, "sha": commit["sha"], "private": self.repos[repo]["private"], "siblings": siblings}
        return 200, {**data, "lastModified": "2026-01-01T00:00:00.000Z", "tags": [], "library_name": "moeify"}

    def tree_listing(self, repo: str, rev: str, path: str | None = None, **_: Any) -> tuple[int, Any]:
        commit = self._resolve_rev(repo, unquote(rev))
        prefix = unquote(path).rstrip("/") + "/" if path else ""
        folder = self.root / repo / commit["sha"]
        entries = [
            {"type": "file", "path": p, "oid": commit["oids"][p], "size": (folder / p).stat().st_size}
            for p in commit["files"]
            if p.startswith(prefix)
        ]
        return 200, entries

    def harnesses(self, **_: Any) -> tuple[int, Any]:
        return 200, {"standardEnvVars": [], "harnesses": {}}

    def resolve(self, repo: str, rev: str, path: str, **_: Any) -> tuple[int, Any]:
        commit = self._resolve_rev(repo, unquote(rev))
        path = unquote(path)
        if path not in commit["files"]:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        data = (self.root / repo / commit["sha"] / path).read_bytes()
        return 200, (data, {"ETag": f'"{commit["oids"][path]}"', "X-Repo-Commit": commit["sha"]})


class _Handler(BaseHTTPRequestHandler):
    timeout = 30  # seconds a connection may stay silent
    server_version = "moeify-test-hub/1"

    def log_message(self, format: str, *args: Any) -> None:  # the base class's name
        pass  # requests are recorded in HubServer.requests instead

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def _route(self, method: str) -> tuple[str, dict[str, str]]:
        path = urlsplit(self.path).path
        for route_method, name, pattern in _COMPILED:
            match = pattern.match(path)
            if route_method == method and match:
                return name, {k: v for k, v in match.groupdict().items() if v is not None}
        raise HubError(404, f"no route for {method} {path}")

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise HubError(411, "Content-Length required")
        if int(length) > self.server.hub.max_body:  # type: ignore[attr-defined]
            raise HubError(413, f"request body over {self.server.hub.max_body} bytes")  # type: ignore[attr-defined]
        return self.rfile.read(int(length))

    def _dispatch(self, hub: HubServer, method: str) -> tuple[str, int, Any]:
        route, params = self._route(method)
        self.route_name = route
        hub._injected_failure(route)
        public = route in ("harnesses", "validate")  # as on the Hub: no token needed
        if hub.token is not None and not public and self.headers.get("Authorization") != f"Bearer {hub.token}":
            raise HubError(401, "Invalid credentials in Authorization header")
        if method != "POST":
            handler = {"tree": hub.tree_listing, "info": hub.info, "resolve": hub.resolve, "harnesses": hub.harnesses}[
                route
            ]
            return route, *handler(**params)
        raw = self._read_body()
        if route == "commit":
            return route, *hub.commit(raw, **params)
        return route, *getattr(hub, route)(json.loads(raw or b"{}"), **params)

    def _handle(self, method: str) -> None:
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        headers: dict[str, str] = {}
        self.route_name = "?"
        try:
            _, status, payload = self._dispatch(hub, method)
        except HubError as error:
            status, payload = error.status, {"error": error.message, **error.extra}
            headers = {"X-Error-Code": error.code} if error.code else {}
            headers["X-Error-Message"] = error.message
        except Exception as error:  # a bug here must reach the test as a 500, not a hung client
            status, payload = 500, {"error": f"{type(error).__name__}: {error}"}
        if isinstance(payload, tuple):  # a file: (bytes, headers)
            body, extra = payload
            headers.update(extra)
            content_type = "application/octet-stream"
        else:
            body, content_type = json.dumps(payload).encode(), "application/json"
        hub.requests.append(
            {
                "method": method,
                "route": self.route_name,
                "path": self.path,
                "status": status,
                "authorization": self.headers.get("Authorization"),
            }
        )
        self.send_response(status)
        for key, value in {"Content-Type": content_type, "Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)
