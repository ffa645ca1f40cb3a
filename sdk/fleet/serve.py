"""Serve a folder of bundles over HTTP, with byte ranges, for local fleets and tests.

Devices resume interrupted downloads with ``Range`` requests, so the server answers a
single byte range with ``206 Partial Content`` (``416`` when it cannot be satisfied) and
gives every file a strong ``ETag`` so that ``If-Range`` keeps a resumed download from
splicing two different files. Any HTTP server, CDN or object store that does the same
works as well: the transport is untrusted, the bundle's signature is the trust.

Only ``GET`` and ``HEAD`` of regular files inside the folder are served: no directory
listings, no paths that leave the folder (``..``, absolute paths, symlinks pointing
outside). The default address is loopback: exposing the folder is an explicit choice.

The same folder serves the fleet's trust chain: ``root/<N>.json`` for every root version
(:func:`add_root` writes them), so a device that missed versions fetches the ones between
its root and the newest, and ``heartbeat.json``. Like bundles, they are only files here:
the device verifies each against the root before it.
"""

from __future__ import annotations

import email.utils
import io
import logging
import os
import re
import threading
import urllib.parse
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO

from agent.errors import ConfigError
from agent.plumbing.files import atomic_write

__all__ = ["BundleServer", "ByteRange", "add_root", "parse_range", "served_root"]

log = logging.getLogger(__name__)

_CHUNK_BYTES = 64 * 1024
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass(frozen=True)
class ByteRange:
    """Bytes ``start`` to ``end`` inclusive (HTTP's convention)."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def parse_range(header: str, size: int) -> ByteRange | None:
    """The single byte range of a ``Range`` header for a file of ``size`` bytes.

    Returns None when the header is to be ignored (not a single ``bytes=`` range: the
    whole file is sent, as RFC 9110 allows).

    Raises:
        ValueError: the range is syntactically fine but not satisfiable (answer 416).
    """
    m = _RANGE.fullmatch(header.strip())
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise ValueError("empty suffix range")
        return ByteRange(max(0, size - n), size - 1)
    start = int(first)
    end = size - 1 if not last else min(int(last), size - 1)
    if last and int(last) < start:
        return None  # invalid: ignore the header
    if start >= size:
        raise ValueError(f"range starts at {start}, the file has {size} bytes")
    return ByteRange(start, end)


def served_root(root_dir: Path, version: int) -> bytes | None:
    """The file the folder serves as root ``version`` (``root/<N>.json``), if any."""
    try:
        return (root_dir / "root" / f"{version}.json").read_bytes()
    except FileNotFoundError:
        return None


def add_root(root_dir: Path, version: int, data: bytes) -> Path:
    """Serve ``data`` as root ``version``: ``<root_dir>/root/<N>.json``, written atomically.

    A version is served once: the same file again is fine, another one is refused (two
    roots of one version would fork the fleet's chain).

    Raises:
        ConfigError: another root of this version is served, or the file cannot be written.
    """
    path = root_dir / "root" / f"{version}.json"
    existing = served_root(root_dir, version)
    if existing is not None and existing != data:
        raise ConfigError(
            f"{path} already holds another root of version {version}; a version is published"
            " once: make the next one"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    return path


def _etag(st: os.stat_result) -> str:
    # Size and nanosecond mtime: cheap (no hashing of large files on every request) and
    # changes whenever a bundle is replaced in place.
    return f'"{st.st_size:x}-{st.st_mtime_ns:x}"'


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "edgeship-serve"

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _not_allowed(self) -> None:
        self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
        self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Length", "0")
        self.end_headers()

    # Handler names are the stdlib's convention: do_<METHOD>.
    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815

    def log_message(self, format: str, *args: object) -> None:
        log.info("%s %s", self.address_string(), format % args)

    def _error(self, status: HTTPStatus, extra: dict[str, str] | None = None) -> None:
        body = f"{status.value} {status.phrase}\n".encode()
        self.send_response(status)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _resolve(self) -> Path | None:
        """The file the request names, or None when it is outside the root or not a file."""
        raw = urllib.parse.urlsplit(self.path).path
        parts = urllib.parse.unquote(raw).split("/")
        if any(p in {"..", "."} or "\\" in p or "\0" in p for p in parts):
            return None
        relative = "/".join(p for p in parts if p)
        if not relative:
            return None
        root = self.server.root
        # realpath follows symlinks: a link inside the folder must not lead out of it.
        target = Path(os.path.realpath(root / relative))
        if not target.is_relative_to(root) or not target.is_file():
            return None
        return target

    def _serve(self, *, body: bool) -> None:
        path = self._resolve()
        if path is None:
            self._error(HTTPStatus.NOT_FOUND)
            return
        try:
            f = path.open("rb")
        except OSError:
            self._error(HTTPStatus.NOT_FOUND)
            return
        with f:
            st = os.fstat(f.fileno())
            size, etag = st.st_size, _etag(st)
            headers = {
                "Accept-Ranges": "bytes",
                "ETag": etag,
                "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True),
            }
            wanted: ByteRange | None = None
            range_header = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            # If-Range with another validator: the file changed, send it whole.
            if range_header is not None and (if_range is None or if_range.strip() == etag):
                try:
                    wanted = parse_range(range_header, size)
                except ValueError:
                    self._error(
                        HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE,
                        {**headers, "Content-Range": f"bytes */{size}"},
                    )
                    return
            if wanted is None:
                self.send_response(HTTPStatus.OK)
                start, length = 0, size
            else:
                self.send_response(HTTPStatus.PARTIAL_CONTENT)
                headers["Content-Range"] = f"bytes {wanted.start}-{wanted.end}/{size}"
                start, length = wanted.start, wanted.length
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if body:
                f.seek(start)
                try:
                    _copy(f, self.wfile, length)
                except (ConnectionResetError, BrokenPipeError) as exc:
                    # A device that lost its link; it resumes with a Range request.
                    log.info("%s went away mid-download: %s", self.address_string(), exc)
                    self.close_connection = True


def _copy(src: BinaryIO, dst: io.BufferedIOBase, length: int) -> None:
    remaining = length
    while remaining > 0:
        chunk = src.read(min(_CHUNK_BYTES, remaining))
        if not chunk:
            break  # the file shrank under us; the client sees a short body
        dst.write(chunk)
        remaining -= len(chunk)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    root: Path


class BundleServer:
    """An HTTP server for the files in ``root``, on a background thread or the caller's.

    Raises (from the constructor): OSError when the address cannot be bound;
    NotADirectoryError when ``root`` is not a directory.
    """

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        resolved = Path(os.path.realpath(root))
        if not resolved.is_dir():
            raise NotADirectoryError(f"{root} is not a directory")
        self._httpd = _Server((host, port), _Handler)
        self._httpd.root = resolved
        self._thread: threading.Thread | None = None
        self._serving = threading.Event()

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self.port}/"

    def url_for(self, name: str) -> str:
        """The URL of the file ``name`` (relative to the root)."""
        return self.url + urllib.parse.quote(name)

    def serve_forever(self) -> None:
        """Serve on this thread until :meth:`shutdown` is called from another one."""
        self._serving.set()
        self._httpd.serve_forever(poll_interval=0.2)

    def start(self) -> None:
        """Serve on a daemon thread."""
        self._thread = threading.Thread(
            target=self.serve_forever, name="edgeship-serve", daemon=True
        )
        self._thread.start()

    def shutdown(self) -> None:
        # shutdown() would wait forever for a serve_forever() that never ran.
        if self._serving.is_set():
            self._httpd.shutdown()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> BundleServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
