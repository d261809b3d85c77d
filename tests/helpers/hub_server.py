""" A loopback Hugging Face Hub for tests: the part of the hub protocol huggingface_hub uses to download files

Serves model repos from a folder (``<root>/<namespace>/<name>/<files>``) on 127.0.0.1 with ``http.server`` in a
background thread, speaking what ``hf_hub_download`` (huggingface_hub 2.x, checked with 2.4) requests:

* ``HEAD``/``GET /{repo_id}/resolve/{revision}/{filename}``, revision 'main' or the repo's commit hash:
  - regular files: 200 with ``X-Repo-Commit``, ``ETag`` (git blob sha1) and ``Content-Length``;
  - LFS-like files (``*.safetensors``, ``*.bin``, ``*.pth``): 302 to the "CDN" (``/cdn/<sha256>`` on the other
    loopback name, ``localhost``, so the client treats it as a foreign host like the real CDN) with
    ``X-Repo-Commit``, ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``;
* ``GET /cdn/<sha256>``: the bytes (``Range: bytes=N-`` honoured);
* ``GET /api/agent-harnesses``: the (empty) registry huggingface_hub 2.x fetches once a day for its user agent;
* errors like the hub: 404 with ``X-Error-Code: RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound`` (the last
  with ``X-Repo-Commit``).

Every request is logged in ``LoopbackHub.requests`` as ``(method, path)``. ``declared_sizes`` overrides the size
announced for a file (``{(repo_id, filename): size}``) to simulate a transfer that breaks off early.

``SilentServer`` is the opposite: an endpoint that accepts TCP connections and reads the requests but never answers
(a hung proxy or server), to test that loading gives up in bounded time.
"""
import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote, urlsplit

__all__ = ['LoopbackHub', 'SilentServer']

_LFS_SUFFIXES = ('.safetensors', '.bin', '.pth')


class LoopbackHub:
    """Loopback hub serving ``root/<namespace>/<name>/`` folders as model repos. Use as a context manager."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.requests: List[Tuple[str, str]] = []
        self.declared_sizes: Dict[Tuple[str, str], int] = {}
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        assert self._server is not None, 'server not started'
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """The endpoint to put in HF_ENDPOINT."""
        return f'http://127.0.0.1:{self.port}'

    def start(self) -> 'LoopbackHub':
        hub = self

        class Handler(_HubHandler):
            owner = hub

        self._server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name='loopback-hub', daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; the port refuses connections afterwards."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None

    def __enter__(self) -> 'LoopbackHub':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # repository model -------------------------------------------------------------------------------------------
    def repo_dir(self, repo_id: str) -> Path:
        return self.root / repo_id

    def commit_hash(self, repo_id: str) -> str:
        """A 40-hex commit id derived from the repo content (changes when any file changes)."""
        h = hashlib.sha1()
        for f in sorted(p for p in self.repo_dir(repo_id).rglob('*') if p.is_file()):
            h.update(str(f.relative_to(self.repo_dir(repo_id))).encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
        return h.hexdigest()

    def find_blob(self, sha256: str) -> Optional[bytes]:
        for f in self.root.rglob('*'):
            if f.is_file() and f.suffix in _LFS_SUFFIXES:
                data = f.read_bytes()
                if hashlib.sha256(data).hexdigest() == sha256:
                    return data
        return None

    def log(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))


class _HubHandler(BaseHTTPRequestHandler):
    owner: LoopbackHub
    protocol_version = 'HTTP/1.1'

    def log_message(self, format, *args) -> None:  # keep test output clean
        pass

    def do_HEAD(self) -> None:
        self._handle(send_body=False)

    def do_GET(self) -> None:
        self._handle(send_body=True)

    def _send(self, status: int, headers: Dict[str, str], body: bytes = b'', send_body: bool = True,
              length: Optional[int] = None) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header('Content-Length', str(len(body) if length is None else length))
        self.end_headers()
        if send_body and body:
            self.wfile.write(body)

    def _error(self, code: str, message: str, send_body: bool, extra: Optional[Dict[str, str]] = None) -> None:
        body = f'{{"error": "{message}"}}'.encode()
        headers = {'X-Error-Code': code, 'X-Error-Message': message, 'Content-Type': 'application/json'}
        headers.update(extra or {})
        self._send(404, headers, body, send_body)

    def _handle(self, send_body: bool) -> None:
        hub = self.owner
        path = unquote(urlsplit(self.path).path)
        hub.log(self.command, path)
        parts = path.strip('/').split('/')
        if path == '/api/agent-harnesses':  # registry huggingface_hub 2.x reads for its user agent: serve it empty
            body = b'{"standardEnvVars": [], "harnesses": {}}'
            return self._send(200, {'Content-Type': 'application/json'}, body, send_body)
        if len(parts) == 2 and parts[0] == 'cdn':
            data = hub.find_blob(parts[1])
            if data is None:
                return self._send(404, {}, b'not found', send_body)
            start = 0
            rng = self.headers.get('Range')
            if rng and rng.startswith('bytes=') and rng.endswith('-'):
                start = int(rng[len('bytes='):-1])
            status = 206 if start else 200
            headers = {'ETag': f'"{parts[1]}"', 'Content-Type': 'application/octet-stream', 'Accept-Ranges': 'bytes'}
            return self._send(status, headers, data[start:], send_body)
        if len(parts) < 5 or parts[2] != 'resolve':
            return self._error('RepoNotFound', 'Repository not found', send_body)
        repo_id, revision, filename = '/'.join(parts[:2]), parts[3], '/'.join(parts[4:])
        repo = hub.repo_dir(repo_id)
        if not repo.is_dir():
            return self._error('RepoNotFound', 'Repository not found', send_body)
        commit = hub.commit_hash(repo_id)
        if revision not in ('main', commit):
            return self._error('RevisionNotFound', 'Invalid rev id', send_body)
        file = repo / filename
        if not file.is_file():
            return self._error('EntryNotFound', 'Entry not found', send_body, {'X-Repo-Commit': commit})
        data = file.read_bytes()
        size = hub.declared_sizes.get((repo_id, filename), len(data))
        if file.suffix in _LFS_SUFFIXES:
            sha = hashlib.sha256(data).hexdigest()
            headers = {
                'X-Repo-Commit': commit,
                'X-Linked-Etag': f'"{sha}"',
                'X-Linked-Size': str(size),
                'ETag': f'"{hashlib.sha1(sha.encode()).hexdigest()}"',
                'Location': f'http://localhost:{hub.port}/cdn/{sha}',
            }
            return self._send(302, headers, b'', send_body)
        git_sha = hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()
        headers = {'X-Repo-Commit': commit, 'ETag': f'"{git_sha}"', 'Content-Type': 'application/octet-stream'}
        return self._send(200, headers, data, send_body)


class SilentServer:
    """Accepts connections on 127.0.0.1 and reads from them, never sending a byte. Use as a context manager."""

    def __init__(self):
        self.connections = 0
        self._sock: Optional[socket.socket] = None
        self._clients: List[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        assert self._sock is not None, 'server not started'
        return f'http://127.0.0.1:{self._sock.getsockname()[1]}'

    def start(self) -> 'SilentServer':
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(('127.0.0.1', 0))
        self._sock.listen(16)
        threading.Thread(target=self._accept, name='silent-server', daemon=True).start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:  # closed by stop()
                return
            with self._lock:
                self.connections += 1
                self._clients.append(client)
            threading.Thread(target=self._drain, args=(client,), daemon=True).start()

    @staticmethod
    def _drain(client: socket.socket) -> None:
        try:
            while client.recv(65536):
                pass
        except OSError:
            pass

    def stop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the serving thread on Linux
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        with self._lock:
            for client in self._clients:
                client.close()
            self._clients.clear()

    def __enter__(self) -> 'SilentServer':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
