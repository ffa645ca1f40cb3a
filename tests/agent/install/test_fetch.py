"""Fetching bundles from local paths and a real HTTP server (with Range, cuts and stalls)."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.errors import DownloadError
from agent.install import FetchConfig
from agent.install._fetch import UrlFetcher
from agent.install._store import partial_path
from agent.plumbing.tls import TlsConfig
from agent.serve.http import ServerTls
from tests.agent.install.test_store import tiny_tmpfs
from tests.support.broker import Pki

CONTENT = os.urandom(300_000)
SHA = hashlib.sha256(CONTENT).hexdigest()
FAST = FetchConfig(connect_timeout_s=2.0, read_timeout_s=2.0, min_free_bytes=0, chunk_bytes=16384)


@dataclass
class Behaviour:
    """How the test server misbehaves; counters decrement as requests are served."""

    content: bytes = CONTENT
    cuts: int = 0  # the next N responses stop after cut_at body bytes
    cut_at: int = 100_000
    stall_seconds: float = 0.0  # sleep before the body
    ranges: bool = True  # honour Range requests
    content_length: bool = True
    status: int = 200
    redirect_to: str | None = None
    seen_ranges: list[str | None] = field(default_factory=list)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        b = self.server.behaviour
        rng = self.headers.get("Range")
        b.seen_ranges.append(rng)
        if b.redirect_to and self.path != b.redirect_to:
            self.send_response(302)
            self.send_header("Location", b.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if b.status != 200:
            self.send_error(b.status)
            return
        body, start = b.content, 0
        if rng and b.ranges:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            body = body[start:]
        else:
            self.send_response(200)
        if b.content_length:
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if b.stall_seconds:
            time.sleep(b.stall_seconds)
        if b.cuts:
            b.cuts -= 1
            self.wfile.write(body[: b.cut_at])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    behaviour: Behaviour
    tls: ssl.SSLContext | None = None

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        if self.tls is None:
            return sock, address
        tls = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        try:
            tls.do_handshake()
        except (ssl.SSLError, OSError):
            # As real servers do (nginx's lingering close): read what the client already
            # sent before closing, so the kernel sends FIN, not RST, and the client reads
            # the TLS alert instead of losing it to a reset.
            raw = socket.socket(fileno=tls.detach())
            with contextlib.suppress(OSError):
                raw.shutdown(socket.SHUT_WR)
                raw.settimeout(0.5)
                while raw.recv(4096):
                    pass
            raw.close()
            raise
        return tls, address


@dataclass
class BundleServer:
    behaviour: Behaviour
    port: int
    scheme: str = "http"
    host: str = "127.0.0.1"

    def url(self, path: str = "/bundle") -> str:
        return f"{self.scheme}://{self.host}:{self.port}{path}"


@contextlib.contextmanager
def serve_bundles(
    context: ssl.SSLContext | None = None, host: str = "127.0.0.1"
) -> Iterator[BundleServer]:
    httpd = _Server((host, 0), _Handler)
    httpd.behaviour = Behaviour()
    httpd.tls = context
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield BundleServer(
            httpd.behaviour, httpd.server_address[1], "https" if context else "http", host
        )
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server() -> Iterator[BundleServer]:
    with serve_bundles() as s:
        yield s


def tls_server_context(pki: Pki, *, client_certs: bool) -> ssl.SSLContext:
    """A server context with the PKI's server certificate; optionally requiring clients'."""
    return ServerTls(
        pki.server_cert, pki.server_key, pki.ca_file if client_certs else None
    ).context()


@pytest.fixture
def https_server(pki: Pki) -> Iterator[BundleServer]:
    with serve_bundles(tls_server_context(pki, client_certs=False)) as s:
        yield s


def test_fetch_copies_a_local_path(tmp_path: Path) -> None:
    src = tmp_path / "b.bundle"
    src.write_bytes(CONTENT)
    dest = tmp_path / "out"
    assert UrlFetcher().fetch(str(src), dest, sha256=SHA, config=FAST) == SHA
    assert dest.read_bytes() == CONTENT
    assert not partial_path(dest).exists()


def test_fetch_reads_a_file_url(tmp_path: Path) -> None:
    src = tmp_path / "b bundle"
    src.write_bytes(CONTENT)
    dest = tmp_path / "out"
    UrlFetcher().fetch(src.as_uri(), dest, sha256=None, config=FAST)
    assert dest.read_bytes() == CONTENT


def test_fetch_of_a_missing_local_file_is_a_download_error(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="cannot read"):
        UrlFetcher().fetch(str(tmp_path / "nope"), tmp_path / "out", sha256=None, config=FAST)


def test_fetch_refuses_an_unknown_scheme(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="local path or an http"):
        UrlFetcher().fetch("ftp://x/b", tmp_path / "out", sha256=None, config=FAST)


def test_fetch_downloads_over_http(server: BundleServer, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    assert UrlFetcher().fetch(server.url(), dest, sha256=SHA, config=FAST) == SHA
    assert dest.read_bytes() == CONTENT
    assert server.behaviour.seen_ranges == [None]


def test_fetch_follows_a_redirect(server: BundleServer, tmp_path: Path) -> None:
    server.behaviour.redirect_to = "/real"
    UrlFetcher().fetch(server.url(), tmp_path / "out", sha256=SHA, config=FAST)
    assert (tmp_path / "out").read_bytes() == CONTENT


def test_interrupted_download_resumes_with_range_requests(
    server: BundleServer, tmp_path: Path
) -> None:
    server.behaviour.cuts = 2
    dest = tmp_path / "out"
    UrlFetcher().fetch(server.url(), dest, sha256=SHA, config=FAST)
    assert dest.read_bytes() == CONTENT
    assert server.behaviour.seen_ranges == [None, "bytes=100000-", "bytes=200000-"]


def test_partial_file_from_an_earlier_run_is_resumed(server: BundleServer, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    partial_path(dest).write_bytes(CONTENT[:1234])
    UrlFetcher().fetch(server.url(), dest, sha256=SHA, config=FAST)
    assert dest.read_bytes() == CONTENT
    assert server.behaviour.seen_ranges == ["bytes=1234-"]


def test_complete_partial_file_is_accepted_on_range_not_satisfiable(
    server: BundleServer, tmp_path: Path
) -> None:
    dest = tmp_path / "out"
    partial_path(dest).write_bytes(CONTENT)
    UrlFetcher().fetch(server.url(), dest, sha256=SHA, config=FAST)
    assert dest.read_bytes() == CONTENT


def test_server_without_range_support_restarts_from_zero(
    server: BundleServer, tmp_path: Path
) -> None:
    server.behaviour.ranges = False
    dest = tmp_path / "out"
    partial_path(dest).write_bytes(b"stale bytes from another file")
    UrlFetcher().fetch(server.url(), dest, sha256=SHA, config=FAST)
    assert dest.read_bytes() == CONTENT


def test_too_many_interruptions_fail_and_keep_the_partial_file(
    server: BundleServer, tmp_path: Path
) -> None:
    server.behaviour.cuts = 10
    server.behaviour.cut_at = 1000
    dest = tmp_path / "out"
    limits = FetchConfig(min_free_bytes=0, max_resumes=2)
    with pytest.raises(DownloadError, match="interrupted 3 times"):
        UrlFetcher().fetch(server.url(), dest, sha256=SHA, config=limits)
    assert partial_path(dest).read_bytes() == CONTENT[:3000]
    assert not dest.exists()


def test_declared_length_over_the_limit_is_refused_before_reading(
    server: BundleServer, tmp_path: Path
) -> None:
    limits = FetchConfig(min_free_bytes=0, max_bundle_bytes=len(CONTENT) - 1)
    with pytest.raises(DownloadError, match="max_bundle_bytes"):
        UrlFetcher().fetch(server.url(), tmp_path / "out", sha256=None, config=limits)
    assert list(tmp_path.iterdir()) == []


def test_undeclared_length_over_the_limit_is_refused_while_streaming(
    server: BundleServer, tmp_path: Path
) -> None:
    server.behaviour.content_length = False
    limits = FetchConfig(min_free_bytes=0, max_bundle_bytes=50_000, chunk_bytes=4096)
    with pytest.raises(DownloadError, match="larger than max_bundle_bytes"):
        UrlFetcher().fetch(server.url(), tmp_path / "out", sha256=None, config=limits)
    assert list(tmp_path.iterdir()) == []


def test_local_file_over_the_limit_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "b"
    src.write_bytes(CONTENT)
    limits = FetchConfig(min_free_bytes=0, max_bundle_bytes=10)
    with pytest.raises(DownloadError, match="max_bundle_bytes"):
        UrlFetcher().fetch(str(src), tmp_path / "out", sha256=None, config=limits)


def test_stalled_server_hits_the_read_timeout(server: BundleServer, tmp_path: Path) -> None:
    server.behaviour.stall_seconds = 2.0
    limits = FetchConfig(min_free_bytes=0, read_timeout_s=0.2, max_resumes=0)
    with pytest.raises(DownloadError, match="timed out"):
        UrlFetcher().fetch(server.url(), tmp_path / "out", sha256=None, config=limits)


def test_unreachable_server_is_a_download_error(tmp_path: Path) -> None:
    limits = FetchConfig(min_free_bytes=0, connect_timeout_s=0.5, max_resumes=1)
    url = f"http://127.0.0.1:{_closed_port()}/b"
    with pytest.raises(DownloadError, match="cannot connect"):
        UrlFetcher().fetch(url, tmp_path / "out", sha256=None, config=limits)


def test_wrong_sha256_is_refused_and_nothing_is_kept(server: BundleServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="sha256"):
        UrlFetcher().fetch(server.url(), tmp_path / "out", sha256="0" * 64, config=FAST)
    assert list(tmp_path.iterdir()) == []


def test_http_error_status_is_a_download_error(server: BundleServer, tmp_path: Path) -> None:
    server.behaviour.status = 404
    with pytest.raises(DownloadError, match="HTTP 404"):
        UrlFetcher().fetch(server.url(), tmp_path / "out", sha256=None, config=FAST)


def test_free_disk_check_refuses_before_writing(server: BundleServer, tmp_path: Path) -> None:
    limits = FetchConfig(min_free_bytes=2**62)
    with pytest.raises(DownloadError, match="not enough disk space"):
        UrlFetcher().fetch(server.url(), tmp_path / "out", sha256=None, config=limits)
    assert list(tmp_path.iterdir()) == []


def test_disk_filling_up_while_streaming_fails_cleanly(
    server: BundleServer, tmp_path: Path
) -> None:
    server.behaviour.content_length = False  # so only the write itself can notice
    with tiny_tmpfs(tmp_path / "fs", "128k") as fs:
        with pytest.raises(DownloadError, match="disk filled up"):
            UrlFetcher().fetch(server.url(), fs / "out", sha256=None, config=FAST)
        assert list(fs.iterdir()) == []


def _closed_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# --- https ---------------------------------------------------------------------------------


def test_fetch_downloads_over_https_from_a_server_signed_by_the_given_ca(
    https_server: BundleServer, pki: Pki, tmp_path: Path
) -> None:
    fetcher = UrlFetcher(TlsConfig(ca_file=pki.ca_file).context())
    dest = tmp_path / "out"
    assert fetcher.fetch(https_server.url(), dest, sha256=SHA, config=FAST) == SHA
    assert dest.read_bytes() == CONTENT


def test_interrupted_https_download_resumes_with_range_requests(
    https_server: BundleServer, pki: Pki, tmp_path: Path
) -> None:
    https_server.behaviour.cuts = 2
    fetcher = UrlFetcher(TlsConfig(ca_file=pki.ca_file).context())
    dest = tmp_path / "out"
    assert fetcher.fetch(https_server.url(), dest, sha256=SHA, config=FAST) == SHA
    assert https_server.behaviour.seen_ranges == [None, "bytes=100000-", "bytes=200000-"]


def test_untrusted_server_certificate_fails_at_once_naming_the_setting(
    https_server: BundleServer, tmp_path: Path
) -> None:
    # The system CAs do not know the test CA. Retrying cannot help, so it is not retried.
    dest = tmp_path / "out"
    with pytest.raises(DownloadError, match=r"does not trust .* set fetch\.ca_file"):
        UrlFetcher().fetch(https_server.url(), dest, sha256=None, config=FAST)
    assert https_server.behaviour.seen_ranges == []
    assert not dest.exists()
    assert not partial_path(dest).exists()


def test_server_certificate_for_another_address_is_refused(pki: Pki, tmp_path: Path) -> None:
    # The certificate names localhost and 127.0.0.1; this server listens on 127.0.0.2.
    fetcher = UrlFetcher(TlsConfig(ca_file=pki.ca_file).context())
    with serve_bundles(tls_server_context(pki, client_certs=False), host="127.0.0.2") as s:
        with pytest.raises(DownloadError, match=r"does not trust .*IP address mismatch"):
            fetcher.fetch(s.url(), tmp_path / "out", sha256=None, config=FAST)
        assert s.behaviour.seen_ranges == []


def test_mutual_tls_server_accepts_the_device_certificate(pki: Pki, tmp_path: Path) -> None:
    device = pki.client("device-1")
    fetcher = UrlFetcher(TlsConfig(pki.ca_file, device.cert_file, device.key_file).context())
    with serve_bundles(tls_server_context(pki, client_certs=True)) as s:
        assert fetcher.fetch(s.url(), tmp_path / "out", sha256=SHA, config=FAST) == SHA


@pytest.mark.parametrize("client", ["none", "foreign"])
def test_mutual_tls_server_refusing_the_client_fails_at_once_naming_the_setting(
    pki: Pki, tmp_path: Path, client: str
) -> None:
    cert = None if client == "none" else pki.foreign
    tls = TlsConfig(pki.ca_file, cert and cert.cert_file, cert and cert.key_file)
    with serve_bundles(tls_server_context(pki, client_certs=True)) as s:
        start = time.monotonic()
        with pytest.raises(DownloadError, match=r"TLS with .* failed .*fetch\.cert_file"):
            UrlFetcher(tls.context()).fetch(s.url(), tmp_path / "out", sha256=None, config=FAST)
        assert s.behaviour.seen_ranges == []
        assert time.monotonic() - start < FAST.connect_timeout_s


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (os.mkfifo, "a FIFO"),  # a plain open() would block forever
        (lambda p: p.mkdir(), "a directory"),
    ],
)
def test_a_local_source_that_is_not_a_regular_file_is_refused_at_once(
    tmp_path: Path, make: Any, kind: str
) -> None:
    src = tmp_path / "bundle"
    make(src)
    started = time.monotonic()
    with pytest.raises(DownloadError, match=f"is {kind}, not a regular file"):
        UrlFetcher().fetch(str(src), tmp_path / "out", sha256=None, config=FAST)
    assert time.monotonic() - started < 5
    assert not (tmp_path / "out").exists()


def test_a_character_device_is_not_taken_for_an_empty_bundle(tmp_path: Path) -> None:
    # /dev/zero has size 0 for fstat, passes a free-space check, and streams forever.
    with pytest.raises(DownloadError, match="is a device, not a regular file"):
        UrlFetcher().fetch("/dev/zero", tmp_path / "out", sha256=None, config=FAST)
