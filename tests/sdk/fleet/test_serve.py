"""edgeship serve: real HTTP requests against a real server on loopback."""

from __future__ import annotations

import http.client
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdk.fleet.serve import BundleServer, ByteRange, parse_range

CONTENT = bytes(range(256)) * 1000 + b"tail"  # 256,004 bytes: several copy chunks


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "bundles"
    folder.mkdir()
    (folder / "digits-1.0.0.edgeship").write_bytes(CONTENT)
    (folder / "sub").mkdir()
    (folder / "sub" / "inner.edgeship").write_bytes(b"inner")
    (tmp_path / "secret.txt").write_bytes(b"do not serve")
    return folder


@pytest.fixture
def server(root: Path) -> Iterator[BundleServer]:
    with BundleServer(root) as s:
        s.start()
        yield s


def request(
    server: BundleServer, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


NAME = "/digits-1.0.0.edgeship"
# The CLI in a subprocess, as the console script runs it.
EDGESHIP = [sys.executable, "-c", "import sys; from sdk.cli import main; sys.exit(main())"]


def test_get_returns_the_whole_file_with_length_etag_and_accept_ranges(
    server: BundleServer,
) -> None:
    status, headers, body = request(server, NAME)
    assert status == 200
    assert body == CONTENT
    assert headers["content-length"] == str(len(CONTENT))
    assert headers["accept-ranges"] == "bytes"
    assert headers["etag"].startswith('"')


def test_head_returns_the_headers_of_get_without_a_body(server: BundleServer) -> None:
    status, headers, body = request(server, NAME, "HEAD")
    assert status == 200
    assert body == b""
    assert headers["content-length"] == str(len(CONTENT))


def test_a_byte_range_returns_206_with_exactly_those_bytes(server: BundleServer) -> None:
    status, headers, body = request(server, NAME, headers={"Range": "bytes=1000-1999"})
    assert status == 206
    assert body == CONTENT[1000:2000]
    assert headers["content-length"] == "1000"
    assert headers["content-range"] == f"bytes 1000-1999/{len(CONTENT)}"


def test_an_interrupted_download_resumes_with_an_open_range(server: BundleServer) -> None:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.request("GET", NAME)
    resp = conn.getresponse()
    first = resp.read(100_000)  # the connection "drops" after 100,000 bytes
    etag = resp.getheader("ETag")
    conn.close()
    assert etag is not None
    status, _, rest = request(server, NAME, headers={"Range": "bytes=100000-", "If-Range": etag})
    assert status == 206
    assert first + rest == CONTENT


def test_a_client_dropping_mid_download_is_one_log_line_not_a_traceback(
    root: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    (root / "big.edgeship").write_bytes(os.urandom(16 * 1024 * 1024))
    with caplog.at_level(logging.INFO, logger="sdk.fleet.serve"), BundleServer(root) as s:
        s.start()
        sock = socket.create_connection((s.host, s.port), timeout=10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.sendall(b"GET /big.edgeship HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.recv(65536)
        sock.close()  # with linger 0: a reset, as from a device losing its link
        deadline = time.monotonic() + 10
        while "went away mid-download" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "went away mid-download" in caplog.text
        # The server still serves.
        assert request(s, NAME)[0] == 200
    assert "Traceback" not in capfd.readouterr().err


def test_a_suffix_range_returns_the_last_bytes(server: BundleServer) -> None:
    status, _, body = request(server, NAME, headers={"Range": "bytes=-4"})
    assert status == 206
    assert body == b"tail"


def test_a_range_past_the_end_is_416_with_the_size(server: BundleServer) -> None:
    status, headers, _ = request(server, NAME, headers={"Range": f"bytes={len(CONTENT)}-"})
    assert status == 416
    assert headers["content-range"] == f"bytes */{len(CONTENT)}"


def test_if_range_with_a_stale_etag_sends_the_whole_file(server: BundleServer) -> None:
    status, _, body = request(server, NAME, headers={"Range": "bytes=10-", "If-Range": '"old"'})
    assert status == 200
    assert body == CONTENT


def test_files_in_subfolders_are_served(server: BundleServer) -> None:
    assert request(server, "/sub/inner.edgeship")[2] == b"inner"


@pytest.mark.parametrize(
    "path",
    [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/sub/../../secret.txt",
        "/sub%2f..%2f..%2fsecret.txt",
        "/..%5csecret.txt",
        "/link-out",
        "/sub",
        "/",
        "/missing.edgeship",
    ],
)
def test_paths_outside_the_folder_or_not_files_are_404(
    server: BundleServer, root: Path, path: str
) -> None:
    (root / "link-out").symlink_to(root.parent / "secret.txt")
    status, _, body = request(server, path)
    assert status == 404
    assert b"do not serve" not in body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_methods_other_than_get_and_head_are_405(server: BundleServer, method: str) -> None:
    status, headers, _ = request(server, NAME, method)
    assert status == 405
    assert headers["allow"] == "GET, HEAD"


def test_the_default_address_is_loopback(root: Path) -> None:
    with BundleServer(root) as s:
        assert s.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-9", ByteRange(0, 9)),
        ("bytes=90-", ByteRange(90, 99)),
        ("bytes=90-500", ByteRange(90, 99)),
        ("bytes=-10", ByteRange(90, 99)),
        ("bytes=-500", ByteRange(0, 99)),
        ("bytes=5-2", None),
        ("bytes=0-1,5-6", None),
        ("items=0-9", None),
        ("bytes=-", None),
    ],
)
def test_parse_range(header: str, expected: ByteRange | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=-0"])
def test_parse_range_refuses_unsatisfiable_ranges(header: str) -> None:
    with pytest.raises(ValueError, match="range"):
        parse_range(header, 100)


@pytest.mark.integration
def test_the_cli_serves_until_sigterm(root: Path) -> None:
    proc = subprocess.Popen(
        [*EDGESHIP, "serve", str(root), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[3],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", NAME, headers={"Range": "bytes=0-3"})
        assert conn.getresponse().read() == CONTENT[:4]
        conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
