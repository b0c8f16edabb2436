"""A local Hugging Face hub for tests: the endpoints huggingface_hub calls to open and download a model.

Served from local model directories (each `publish` is a new commit on main), over two HTTP servers on
127.0.0.1:

- the hub (`endpoint`, set as HF_ENDPOINT): `GET /api/models/{repo}[/revision/{rev}]` (model info; with
  `?blobs=True` the siblings carry size, blob id and LFS sha256) and `HEAD|GET /{repo}/resolve/{rev}/{file}`.
  A plain git file answers 200 with ETag (its git blob sha1), X-Repo-Commit and the bytes. An LFS file
  (*.safetensors) answers 302 to the CDN with X-Repo-Commit, X-Linked-Etag (its sha256) and X-Linked-Size, as
  the real hub does; huggingface_hub takes the metadata from that redirect and downloads from the CDN.
- the CDN (another port, so another origin): `HEAD|GET /cdn/{repo}/{commit}/{file}`, honouring Range.

Errors carry the X-Error-Code headers huggingface_hub maps to its exceptions (RepoNotFound, RevisionNotFound,
EntryNotFound). Every request is logged (`log`), so tests count header reads and downloads; huggingface_hub's
best-effort fetch of its agent registry (`/api/agent-harnesses`, telemetry) gets a 404 and is not logged.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class RepoFile:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def blob_id(self) -> str:
        """The git blob the repo stores: the file itself, or its LFS pointer."""
        return git_blob_id(self.pointer if self.lfs else self.data)

    def sibling(self, name: str) -> dict:
        entry: dict = {"rfilename": name, "size": len(self.pointer if self.lfs else self.data), "blobId": self.blob_id}
        if self.lfs:
            entry["lfs"] = {"sha256": self.sha256, "size": len(self.data), "pointerSize": len(self.pointer)}
        return entry


@dataclass(frozen=True)
class Hit:
    server: str  # "hub" or "cdn"
    method: str
    path: str
    range: str | None


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, dict[str, RepoFile]]] = {}  # repo id -> commit -> files
        self.main: dict[str, str] = {}  # repo id -> the commit main points to
        self.log: list[Hit] = []
        self.env: dict[str, str] = {}  # the HF_* variables a test set to point huggingface_hub here
        self.delay_s = 0.0  # added to every full-file download: keeps concurrent downloads overlapping
        self._servers: list[ThreadingHTTPServer] = []

    def publish(self, repo_id: str, directory: Path) -> str:
        """Commit every file of `directory` to `repo_id` and move main there; returns the commit sha."""
        files = {p.relative_to(directory).as_posix(): RepoFile(p.read_bytes(), p.name.endswith(LFS_SUFFIXES))
                 for p in sorted(directory.rglob("*")) if p.is_file()}
        parent = self.main.get(repo_id, "")
        commit = hashlib.sha1(json.dumps([parent, {n: f.blob_id for n, f in files.items()}]).encode()).hexdigest()
        self.repos.setdefault(repo_id, {})[commit] = files
        self.main[repo_id] = commit
        return commit

    # -- servers ----------------------------------------------------------------------------------------
    def start(self) -> FakeHub:
        for role in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, role))
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self._servers.append(server)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    # -- what was asked -----------------------------------------------------------------------------------
    def downloads(self) -> list[str]:
        """`org/name/file` of every full-file GET of a weight file (not a ranged header read)."""
        paths = [h.path.removeprefix("/cdn/").split("/") for h in self.log
                 if h.server == "cdn" and h.method == "GET" and h.range is None]
        return sorted("/".join([*p[:2], *p[3:]]) for p in paths)

    def weight_reads(self) -> list[Hit]:
        return [h for h in self.log if h.server == "cdn" and h.method == "GET"]


class _NotFound(Exception):
    def __init__(self, code: str, commit: str | None = None) -> None:
        self.code, self.commit = code, commit


def _handler(hub: FakeHub, role: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            url = urlsplit(self.path)
            if url.path == "/api/agent-harnesses":
                return self._reply(404, {}, b"")
            hub.log.append(Hit(role, self.command, unquote(url.path), self.headers.get("Range")))
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            try:
                if role == "cdn" and parts[0] == "cdn":
                    self._file(self._lookup(parts[1:3], parts[3], "/".join(parts[4:])), body)
                elif role == "hub" and parts[:1] == ["api"] and parts[1:2] == ["models"]:
                    self._model_info(parts[2:], "blobs" in parse_qs(url.query))
                elif role == "hub" and len(parts) > 4 and parts[2] == "resolve":
                    self._resolve(parts[:2], parts[3], "/".join(parts[4:]), body)
                else:
                    self._reply(404, {}, b"")
            except _NotFound as e:
                extra = {"X-Repo-Commit": e.commit} if e.commit else {}
                self._reply(404, {"X-Error-Code": e.code, **extra}, b"")

        def _lookup(self, repo: list[str], revision: str, name: str | None) -> tuple[str, RepoFile | None]:
            repo_id = "/".join(repo)
            if repo_id not in hub.repos:
                raise _NotFound("RepoNotFound")
            commit = hub.main[repo_id] if revision == "main" else revision
            if commit not in hub.repos[repo_id]:
                raise _NotFound("RevisionNotFound")
            files = hub.repos[repo_id][commit]
            if name is not None and name not in files:
                raise _NotFound("EntryNotFound", commit)
            return commit, files.get(name) if name is not None else None

        def _model_info(self, rest: list[str], blobs: bool) -> None:
            revision = rest[3] if len(rest) >= 4 and rest[2] == "revision" else "main"
            commit, _ = self._lookup(rest[:2], revision, None)
            repo_id = "/".join(rest[:2])
            files = hub.repos[repo_id][commit]
            siblings = [f.sibling(n) if blobs else {"rfilename": n} for n, f in files.items()]
            data = json.dumps({"_id": commit[:24], "id": repo_id, "modelId": repo_id, "sha": commit,
                               "private": False, "siblings": siblings}).encode()
            self._reply(200, {"Content-Type": "application/json"}, data)

        def _resolve(self, repo: list[str], revision: str, name: str, body: bool) -> None:
            commit, file = self._lookup(repo, revision, name)
            assert file is not None
            headers = {"X-Repo-Commit": commit}
            if file.lfs:
                location = f"{hub.cdn}/cdn/{'/'.join(repo)}/{commit}/{name}"
                self._reply(302, {**headers, "Location": location, "ETag": f'"{file.blob_id}"',
                                  "X-Linked-Etag": f'"{file.sha256}"', "X-Linked-Size": str(len(file.data))}, b"")
            else:
                self._file((commit, file), body, {**headers, "ETag": f'"{file.blob_id}"'})

        def _file(self, found: tuple[str, RepoFile | None], body: bool, headers: dict | None = None) -> None:
            _, file = found
            assert file is not None
            data, status, headers = file.data, 200, dict(headers or {})
            if (spec := self.headers.get("Range")) is None:
                time.sleep(hub.delay_s if body else 0.0)
            else:
                first, _, last = spec.removeprefix("bytes=").partition("-")
                start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data, status = data[start:end + 1], 206
            self._reply(status, headers, data if body else b"", len(data))

        def _reply(self, status: int, headers: dict, data: bytes, length: int | None = None) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data) if length is None else length))
            self.end_headers()
            if data:
                self.wfile.write(data)

    return Handler
