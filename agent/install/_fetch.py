"""Getting a bundle onto the device: from a local path or an http(s) URL.

Every fetch streams into a partial file in the staging area, with a maximum length
checked while streaming, connect and read timeouts, a free-disk check before writing,
and resumption with a ``Range`` request after an interruption (also across agent
restarts: the partial file stays until the fetch completes or fails for good). The
file's sha256 is checked against the one the request named, if any. An answer that a
retry would only repeat (an HTTP 4xx, another file, one over the size cap, a refused TLS
handshake) is a :class:`~agent.errors.DownloadRefusedError`; a network failure that
outlasted the resumptions is a plain :class:`~agent.errors.DownloadError`.

The transport is untrusted: the bundle's signature is what makes it acceptable. Tests
and users can plug another transport in through the :class:`Fetcher` protocol.
"""

from __future__ import annotations

import errno
import http.client
import os
import re
import shutil
import ssl
import urllib.parse
from pathlib import Path
from typing import BinaryIO, Protocol

from agent.errors import ConfigError, DownloadError, DownloadRefusedError
from agent.install._config import FetchConfig
from agent.install._store import partial_path
from agent.plumbing.files import NotRegularFileError, file_sha256, open_regular
from agent.plumbing.tls import TlsConfig

__all__ = ["Fetcher", "UrlFetcher"]


class Fetcher(Protocol):
    """Puts the bytes at ``source`` into the file ``dest`` (complete, or not at all)."""

    def fetch(self, source: str, dest: Path, *, sha256: str | None, config: FetchConfig) -> str:
        """Fetch ``source`` to ``dest`` and return the file's sha256 (hex).

        Raises:
            DownloadError: the bytes could not be obtained, were too large, or do not
                match ``sha256``.
        """
        ...


class _Interrupted(Exception):  # noqa: N818 - internal signal, never escapes this module
    """A transient transport failure: resume from what we have."""


class UrlFetcher:
    """The default transport: local paths, ``file://``, ``http://`` and ``https://``."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context

    @classmethod
    def from_tls(cls, tls: TlsConfig | None, *, setting: str) -> UrlFetcher:
        """A fetcher trusting ``tls``'s CA and presenting its client certificate (None:
        the system's CAs, no client certificate).

        Raises:
            ConfigError: a file is missing or unusable; the message names ``setting``.
        """
        if tls is None:
            return cls()
        try:
            return cls(tls.context())
        except OSError as exc:  # ssl.SSLError is an OSError
            raise ConfigError(f"{setting} TLS files are unusable: {exc}") from None

    def fetch(self, source: str, dest: Path, *, sha256: str | None, config: FetchConfig) -> str:
        """Fetch ``source`` to ``dest``; see :class:`Fetcher`.

        Raises:
            DownloadError: as :meth:`Fetcher.fetch`.
        """
        partial = partial_path(dest)
        scheme = urllib.parse.urlsplit(source).scheme.lower()
        if scheme in ("http", "https"):
            self._fetch_http(source, partial, config)
        elif scheme in ("", "file"):
            path = urllib.parse.unquote(urllib.parse.urlsplit(source).path) if scheme else source
            _fetch_file(Path(path), partial, config)
        else:
            raise DownloadRefusedError(
                f"cannot fetch {source!r}: use a local path or an http(s) URL"
            )
        actual = file_sha256(partial)
        if sha256 is not None and actual != sha256.lower():
            partial.unlink(missing_ok=True)
            raise DownloadRefusedError(
                f"{source} has sha256 {actual}, but the request says {sha256}; the download"
                " was corrupted or the URL serves another file"
            )
        os.replace(partial, dest)
        return actual

    def _fetch_http(self, url: str, partial: Path, config: FetchConfig) -> None:
        last = ""
        for _ in range(config.max_resumes + 1):
            try:
                self._http_once(url, partial, config)
            except _Interrupted as exc:
                last = str(exc)
                continue
            return
        raise DownloadError(
            f"downloading {url} was interrupted {config.max_resumes + 1} times (last: {last});"
            " check the network and retry: the partial file is kept and the download resumes"
        )

    def _connect(self, url: str, config: FetchConfig) -> tuple[http.client.HTTPConnection, str]:
        parts = urllib.parse.urlsplit(url)
        if not parts.hostname:
            raise DownloadRefusedError(f"URL {url!r} has no host")
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(
                parts.hostname,
                parts.port,
                timeout=config.connect_timeout_s,
                context=self.ssl_context or ssl.create_default_context(),
            )
        else:
            conn = http.client.HTTPConnection(
                parts.hostname, parts.port, timeout=config.connect_timeout_s
            )
        try:
            conn.connect()
        except ssl.SSLError as exc:
            conn.close()
            if _transient_tls(exc):
                raise _Interrupted(f"TLS with {parts.netloc} was cut: {exc}") from None
            raise DownloadRefusedError(_tls_failure(parts.netloc, exc)) from None
        except OSError as exc:
            conn.close()
            raise _Interrupted(f"cannot connect to {parts.netloc}: {exc}") from None
        # Connecting may take long on a bad link; once connected, each read has its own limit.
        if conn.sock is not None:
            conn.sock.settimeout(config.read_timeout_s)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        return conn, target

    def _http_once(self, url: str, partial: Path, config: FetchConfig) -> None:
        offset = partial.stat().st_size if partial.exists() else 0
        for _ in range(config.max_redirects + 1):
            conn, target = self._connect(url, config)
            try:
                headers = {"User-Agent": "edgeship-agent", "Accept-Encoding": "identity"}
                if offset:
                    headers["Range"] = f"bytes={offset}-"
                try:
                    conn.request("GET", target, headers=headers)
                    resp = conn.getresponse()
                except ssl.SSLError as exc:
                    # TLS 1.3 reports a refused client certificate only here, after the
                    # handshake seemed to succeed.
                    if _transient_tls(exc):
                        raise _Interrupted(f"request failed: {exc}") from None
                    netloc = urllib.parse.urlsplit(url).netloc
                    raise DownloadRefusedError(_tls_failure(netloc, exc)) from None
                except (OSError, http.client.HTTPException) as exc:
                    raise _Interrupted(f"request failed: {exc}") from None
                if resp.status in (301, 302, 303, 307, 308):
                    location = resp.getheader("Location")
                    if not location:
                        raise DownloadRefusedError(f"{url} redirects without a Location")
                    url = urllib.parse.urljoin(url, location)
                    continue
                _receive(url, resp, partial, offset, config)
                return
            finally:
                conn.close()
        raise DownloadRefusedError(f"{url}: more than {config.max_redirects} redirects")


def _transient_tls(exc: ssl.SSLError) -> bool:
    """A TLS connection cut by the network (worth a retry), not a TLS refusal."""
    return isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLWantReadError))


def _tls_failure(netloc: str, exc: ssl.SSLError) -> str:
    """Why TLS with ``netloc`` failed, and what to configure; retrying would not help."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"{netloc} presented a TLS certificate this device does not trust"
            f" ({exc.verify_message}); set fetch.ca_file to the CA that issued it"
        )
    reason = exc.reason or str(exc)
    hint = ""
    # Alerts the server sent about our client certificate (missing, or from a CA it
    # does not trust).
    if "ALERT" in reason.upper() and any(
        word in reason.upper() for word in ("CERTIFICATE", "UNKNOWN_CA", "ACCESS_DENIED")
    ):
        hint = (
            "; the server wants a client certificate it trusts: set fetch.cert_file and"
            " fetch.key_file"
        )
    return f"TLS with {netloc} failed ({reason}){hint}"


_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def _receive(
    url: str,
    resp: http.client.HTTPResponse,
    partial: Path,
    offset: int,
    config: FetchConfig,
) -> None:
    if resp.status == 416 and offset:
        # Our partial file may already be complete; otherwise it is stale: start over.
        total = (resp.getheader("Content-Range") or "").rpartition("/")[2]
        if total.isdigit() and int(total) == offset:
            return
        partial.unlink(missing_ok=True)
        raise _Interrupted("the server refused the resume range; starting over")
    if resp.status >= 500 or resp.status in (408, 429):  # the server may answer later
        raise _Interrupted(f"HTTP {resp.status} {resp.reason}")
    if resp.status == 206:
        m = _CONTENT_RANGE_RE.match(resp.getheader("Content-Range") or "")
        if not m or int(m.group(1)) != offset:
            partial.unlink(missing_ok=True)
            raise _Interrupted("the server answered another range than requested; starting over")
    elif resp.status == 200:
        offset = 0  # no range support (or no range asked): the body is the whole file
    else:
        raise DownloadRefusedError(f"{url}: HTTP {resp.status} {resp.reason}; check the URL")

    length_header = resp.getheader("Content-Length")
    remaining = int(length_header) if length_header and length_header.isdigit() else None
    if remaining is not None and offset + remaining > config.max_bundle_bytes:
        partial.unlink(missing_ok=True)
        raise DownloadRefusedError(
            f"{url} is {offset + remaining} bytes; max_bundle_bytes is {config.max_bundle_bytes}"
        )
    _check_free_space(partial.parent, remaining or 0, config)
    mode = "ab" if offset else "wb"
    received = 0
    with _open_partial(partial, mode) as out:
        while True:
            try:
                chunk = resp.read(config.chunk_bytes)
            except (OSError, http.client.HTTPException) as exc:
                _flush(out, partial)
                raise _Interrupted(f"read failed after {offset + received} bytes: {exc}") from None
            if not chunk:
                break
            received += len(chunk)
            if offset + received > config.max_bundle_bytes:
                out.close()
                partial.unlink(missing_ok=True)
                raise DownloadRefusedError(
                    f"{url} is larger than max_bundle_bytes ({config.max_bundle_bytes})"
                )
            _write(out, chunk, partial)
        _flush(out, partial)
    if remaining is not None and received < remaining:
        raise _Interrupted(f"connection closed after {offset + received} bytes")


def _fetch_file(source: Path, partial: Path, config: FetchConfig) -> None:
    try:
        src = open_regular(source)
    except NotRegularFileError as exc:
        raise DownloadError(f"{exc}; give the path of a bundle file") from None
    except OSError as exc:
        raise DownloadError(f"cannot read {source}: {exc.strerror}") from None
    with src:
        size = os.fstat(src.fileno()).st_size
        if size > config.max_bundle_bytes:
            raise DownloadError(
                f"{source} is {size} bytes; max_bundle_bytes is {config.max_bundle_bytes}"
            )
        _check_free_space(partial.parent, size, config)
        copied = 0
        with _open_partial(partial, "wb") as out:
            while chunk := src.read(config.chunk_bytes):
                copied += len(chunk)
                if copied > config.max_bundle_bytes:  # the file grew while we read it
                    out.close()
                    partial.unlink(missing_ok=True)
                    raise DownloadError(f"{source} grew beyond max_bundle_bytes while copying")
                _write(out, chunk, partial)
            _flush(out, partial)


def _open_partial(partial: Path, mode: str) -> BinaryIO:
    try:
        return partial.open(mode)  # type: ignore[return-value]
    except OSError as exc:
        raise DownloadError(f"cannot write {partial}: {exc.strerror}") from None


def _check_free_space(directory: Path, needed: int, config: FetchConfig) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed + config.min_free_bytes:
        raise DownloadError(
            f"not enough disk space in {directory}: {free} bytes free, the bundle needs"
            f" {needed} plus {config.min_free_bytes} kept free; free some space"
        )


def _disk_error(exc: OSError, partial: Path) -> DownloadError:
    # A full disk cannot be resumed into: drop the partial file to give the space back.
    partial.unlink(missing_ok=True)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DownloadError(f"the disk filled up while writing {partial.name}; free some space")
    return DownloadError(f"cannot write {partial}: {exc.strerror}")


def _write(out: BinaryIO, chunk: bytes, partial: Path) -> None:
    try:
        out.write(chunk)
    except OSError as exc:
        out.close()
        raise _disk_error(exc, partial) from None


def _flush(out: BinaryIO, partial: Path) -> None:
    try:
        out.flush()
        os.fsync(out.fileno())
    except OSError as exc:
        out.close()
        raise _disk_error(exc, partial) from None
