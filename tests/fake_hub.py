"""An in-memory Hugging Face Hub for offline push/load tests (standard library only).

It answers the subset of the Hub API that `huggingface_hub` and `transformers` use to create a repo,
create a branch, commit files and download them again: enough for `model.push_to_hub`,
`HfApi.upload_folder`, `Trainer(push_to_hub=True)` and `from_pretrained(repo_id)` with
`HF_ENDPOINT=<FakeHub.url>` in the environment of the client process (huggingface_hub reads it at
import). Like the real Hub it keeps every commit (so a test can load an intermediate push by its
commit id), refuses commits to branches that do not exist, records repo visibility, hides private
repos from requests without the token and requires the token for every write. Every file is
answered `uploadMode: regular` (base64 inside the commit), so no LFS or Xet storage is involved.

The server listens on 127.0.0.1 only, on a free port, answers one request at a time per
connection with a socket timeout, refuses bodies above `max_body_bytes` and shuts itself down
after `lifetime_s` seconds even if nobody calls `stop()`.

    with FakeHub() as hub:
        env = {**os.environ, **hub.client_env(tmp_path / "hf_home")}
        subprocess.run([...], env=env)
        hub.repos["tester/demo"].files("main")
"""

import base64
import hashlib
import json
import re
import threading
import traceback
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

USER = "tester"
TOKEN = "hf_fake_hub_token"


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]
    parent: str | None = None


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """The commit a branch name or a full commit id points to."""
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)

    def files(self, revision: str = "main") -> dict[str, bytes]:
        return self.resolve(revision).files

    def history(self, branch: str = "main") -> list[Commit]:
        """Commits of `branch`, oldest first."""
        commits, oid = [], self.branches[branch]
        while oid is not None:
            commits.append(self.commits[oid])
            oid = self.commits[oid].parent
        return commits[::-1]

    def add_commit(self, branch: str, message: str, files: dict[str, bytes]) -> Commit:
        commit = Commit(uuid.uuid4().hex + uuid.uuid4().hex[:8], message, files, self.branches.get(branch))
        self.commits[commit.oid] = commit
        self.branches[branch] = commit.oid
        return commit


class HubError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


class FakeHub:
    """The server; `repos` maps repo ids to `Repo`s and can be inspected (not mutated) while it runs."""

    def __init__(self, token: str = TOKEN, lifetime_s: float = 900.0, max_body_bytes: int = 512 * 2**20):
        self.token = token
        self.lifetime_s = lifetime_s
        self.max_body_bytes = max_body_bytes
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.timer: threading.Timer | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def client_env(self, hf_home) -> dict[str, str]:
        """Environment for a client process: must be set before it imports huggingface_hub."""
        return {
            "HF_ENDPOINT": self.url,
            "HF_TOKEN": self.token,
            "HF_HOME": str(hf_home),
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_XET": "1",
        }

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.timer = threading.Timer(self.lifetime_s, self.stop)
        self.timer.daemon = True
        self.timer.start()
        return self

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- API --------------------------------------------------------------------------------

    def repo(self, repo_id: str, authorized: bool) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            raise HubError(401 if repo is not None else 404, "RepoNotFound", f"Repository {repo_id} not found")
        return repo

    def commit_at(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def branch(self, repo: Repo, revision: str) -> str:
        if revision not in repo.branches:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision} (create the branch first)")
        return revision

    def create_repo(self, payload: dict, host: str) -> dict:
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        if repo_id in self.repos:
            # Like the Hub, the conflict still says where the repo is (create_repo(exist_ok=True) reads it).
            raise HubError(409, "RepoExists", f"You already created this model repo: {repo_id}", url=f"{host}/{repo_id}")
        private = payload.get("visibility") == "private" or payload.get("private") is True
        repo = self.repos[repo_id] = Repo(repo_id, private)
        repo.add_commit("main", "initial commit", {})
        return {"url": f"{host}/{repo_id}", "name": repo_id, "id": repo_id}

    def create_branch(self, repo: Repo, branch: str, payload: dict) -> dict:
        if branch in repo.branches:
            raise HubError(409, "BranchExists", f"Branch {branch} already exists")
        repo.branches[branch] = self.commit_at(repo, payload.get("startingPoint") or "main").oid
        return {}

    def commit(self, repo: Repo, branch: str, body: bytes, host: str) -> dict:
        self.branch(repo, branch)
        files, message = dict(repo.files(branch)), ""
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value.get("summary", "")
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {path: data for path, data in files.items() if not path.startswith(prefix)}
            else:
                raise HubError(400, "BadRequest", f"The fake Hub does not support {key!r} commit operations")
        commit = repo.add_commit(branch, message, files)
        return {"commitUrl": f"{host}/{repo.repo_id}/commit/{commit.oid}", "commitOid": commit.oid, "pullRequestUrl": None}

    def info(self, repo: Repo, revision: str) -> dict:
        commit = self.commit_at(repo, revision)
        return {
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": commit.oid,
            "private": repo.private,
            "tags": [],
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        }

    def tree(self, repo: Repo, revision: str, folder: str) -> list[dict]:
        files = self.commit_at(repo, revision).files
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        return [
            {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            for path, data in sorted(files.items())
            if path.startswith(prefix)
        ]

    def refs(self, repo: Repo) -> dict:
        branches = [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid} for name, oid in repo.branches.items()]
        return {"branches": branches, "converts": [], "tags": []}


# Routes on the raw (still percent-encoded) path, so a revision like `refs%2Fpr%2F1` stays one segment.
SEGMENT = r"([^/]+)"
REPO = rf"{SEGMENT}/{SEGMENT}"
ROUTES = [
    ("GET", r"^/api/whoami-v2$", "whoami"),
    ("POST", r"^/api/validate-yaml$", "validate_yaml"),
    ("POST", r"^/api/repos/create$", "create_repo"),
    ("POST", rf"^/api/models/{REPO}/branch/{SEGMENT}$", "create_branch"),
    ("POST", rf"^/api/models/{REPO}/preupload/{SEGMENT}$", "preupload"),
    ("POST", rf"^/api/models/{REPO}/commit/{SEGMENT}$", "commit"),
    ("GET", rf"^/api/models/{REPO}/refs$", "refs"),
    ("GET", rf"^/api/models/{REPO}/tree/{SEGMENT}(/.*)?$", "tree"),
    ("GET", rf"^/api/models/{REPO}(?:/revision/{SEGMENT})?$", "info"),
    ("GET", rf"^/{REPO}/resolve/{SEGMENT}/(.+)$", "resolve"),
]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60
    hub: FakeHub

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.route()

    def do_HEAD(self) -> None:
        self.route()

    def do_POST(self) -> None:
        self.route()

    def send(self, status: int, body=b"", content_type="application/json", headers=None) -> None:
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def read_body(self) -> bytes:
        if self.command != "POST":
            return b""
        if self.headers.get("Transfer-Encoding"):
            raise HubError(411, "LengthRequired", "The fake Hub needs a Content-Length")
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.hub.max_body_bytes:
            raise HubError(413, "PayloadTooLarge", f"Body of {length} bytes exceeds {self.hub.max_body_bytes}")
        return self.rfile.read(length)

    def route(self) -> None:
        hub = self.hub
        raw_path = urlparse(self.path).path
        try:
            body = self.read_body()
            hub.requests.append(f"{self.command} {unquote(raw_path)}")
            for method, pattern, name in ROUTES:
                match = re.match(pattern, raw_path)
                if match and (self.command == method or (method == "GET" and self.command == "HEAD")):
                    args = [unquote(group) if group is not None else None for group in match.groups()]
                    with hub.lock:
                        return getattr(self, name)(body, *args)
            raise HubError(404, "NotFound", f"The fake Hub has no route for {self.command} {raw_path}")
        except HubError as error:
            body = {"error": error.message, **error.extra}
            self.send(error.status, body, headers={"X-Error-Code": error.code, "X-Error-Message": error.message})
        except Exception as error:  # a bug in the fake: answer it instead of dropping the connection
            hub.errors.append(f"{self.command} {raw_path}: {traceback.format_exc()}")
            self.send(500, {"error": f"fake Hub error: {error!r}"})

    @property
    def authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {self.hub.token}"

    @property
    def host(self) -> str:
        return f"http://{self.headers['Host']}"

    def require_token(self) -> None:
        if not self.authorized:
            raise HubError(401, "Unauthorized", "Invalid credentials in Authorization header")

    def writable_repo(self, namespace: str, name: str) -> Repo:
        self.require_token()
        return self.hub.repo(f"{namespace}/{name}", authorized=True)

    # ---- routes -----------------------------------------------------------------------------

    def whoami(self, body) -> None:
        self.require_token()
        self.send(200, {"type": "user", "name": USER, "orgs": [], "auth": {"accessToken": {"role": "write"}}})

    def validate_yaml(self, body) -> None:
        self.send(200, {"errors": [], "warnings": []})

    def create_repo(self, body) -> None:
        self.require_token()
        self.send(200, self.hub.create_repo(json.loads(body), self.host))

    def create_branch(self, body, namespace, name, branch) -> None:
        repo = self.writable_repo(namespace, name)
        self.send(200, self.hub.create_branch(repo, branch, json.loads(body or b"{}")))

    def preupload(self, body, namespace, name, revision) -> None:
        self.hub.branch(self.writable_repo(namespace, name), revision)
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in json.loads(body)["files"]]
        self.send(200, {"files": files})

    def commit(self, body, namespace, name, revision) -> None:
        repo = self.writable_repo(namespace, name)
        self.send(200, self.hub.commit(repo, revision, body, self.host))

    def refs(self, body, namespace, name) -> None:
        self.send(200, self.hub.refs(self.hub.repo(f"{namespace}/{name}", self.authorized)))

    def tree(self, body, namespace, name, revision, folder) -> None:
        repo = self.hub.repo(f"{namespace}/{name}", self.authorized)
        self.send(200, self.hub.tree(repo, revision, folder or ""))

    def info(self, body, namespace, name, revision) -> None:
        repo = self.hub.repo(f"{namespace}/{name}", self.authorized)
        self.send(200, self.hub.info(repo, revision or "main"))

    def resolve(self, body, namespace, name, revision, path) -> None:
        repo = self.hub.repo(f"{namespace}/{name}", self.authorized)
        commit = self.hub.commit_at(repo, revision)
        if path not in commit.files:
            raise HubError(404, "EntryNotFound", f"{path} not found at {revision}")
        data = commit.files[path]
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
        self.send(200, data, content_type="application/octet-stream", headers=headers)


if __name__ == "__main__":
    import sys
    import time

    with FakeHub(lifetime_s=float(sys.argv[1]) if len(sys.argv) > 1 else 3600.0) as running:
        print(f"HF_ENDPOINT={running.url} HF_TOKEN={running.token}", flush=True)
        while running.timer.is_alive():
            time.sleep(1)
