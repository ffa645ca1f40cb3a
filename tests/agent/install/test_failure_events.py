"""What a failed install tells the fleet: which bundle failed, and whether retrying can help.

A rollout decides from these events alone (docs/mqtt.md, "events"): a download that the
server refused for good, a bundle that failed verification before its digest was known,
a candidate rolled back after probation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import DownloadError, DownloadRefusedError, UntrustedSignerError
from agent.install import Updater, UpdaterConfig
from agent.install._fetch import UrlFetcher
from agent.serve._slot import ModelSlot
from tests.agent.install.test_fetch import FAST, SHA, BundleServer, serve_bundles
from tests.agent.install.test_updater import Events
from tests.support.broker import free_port
from tests.support.bundles import make_key
from tests.support.lifecycle import POLICY, LifecycleBundle, make_model_bundle


@pytest.fixture
def server() -> Iterator[BundleServer]:
    with serve_bundles() as s:
        yield s


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LifecycleBundle]:
    d = tmp_path_factory.mktemp("bundles")
    return {
        "v1": make_model_bundle(d, seed=1, sequence=1),
        "foreign": make_model_bundle(d, seed=9, sequence=2, key=make_key("stranger")),
    }


@pytest.mark.parametrize("status", [400, 403, 404, 410])
def test_an_http_4xx_answer_is_a_refused_download(
    server: BundleServer, tmp_path: Path, status: int
) -> None:
    server.behaviour.status = status
    with pytest.raises(DownloadRefusedError, match=f"HTTP {status}"):
        UrlFetcher().fetch(server.url(), tmp_path / "out", sha256=SHA, config=FAST)


@pytest.mark.parametrize("status", [408, 429, 500, 503])
def test_an_answer_that_may_change_is_a_plain_download_error(
    server: BundleServer, tmp_path: Path, status: int
) -> None:
    server.behaviour.status = status
    with pytest.raises(DownloadError) as caught:
        UrlFetcher().fetch(server.url(), tmp_path / "out", sha256=SHA, config=FAST)
    assert not isinstance(caught.value, DownloadRefusedError)


def test_a_url_serving_another_file_is_a_refused_download(
    server: BundleServer, tmp_path: Path
) -> None:
    with pytest.raises(DownloadRefusedError, match="serves another file"):
        UrlFetcher().fetch(server.url(), tmp_path / "out", sha256="0" * 64, config=FAST)


def _failed_download(tmp_path: Path, url: str, sha256: str) -> dict[str, object]:
    events = Events()
    u = Updater(tmp_path / "state", POLICY, events=events, config=UpdaterConfig(fetch=FAST))
    with pytest.raises(DownloadError):
        u.install(url, sha256=sha256)
    kinds = events.kinds()
    return events.seen[kinds.index("download-failed")][1]


def test_a_404_download_failure_event_names_the_bundle_and_is_permanent(
    server: BundleServer, tmp_path: Path
) -> None:
    server.behaviour.status = 404
    fields = _failed_download(tmp_path, server.url(), SHA)
    assert fields["sha256"] == SHA
    assert fields["permanent"] is True
    assert "HTTP 404" in str(fields["reason"])


def test_a_download_failure_of_an_unreachable_server_is_not_permanent(tmp_path: Path) -> None:
    fields = _failed_download(tmp_path, f"http://127.0.0.1:{free_port()}/b", SHA)
    assert fields["sha256"] == SHA
    assert fields["permanent"] is False


def test_a_verification_failure_event_names_the_bundle_file_before_its_digest_is_known(
    tmp_path: Path, bundles: dict[str, LifecycleBundle]
) -> None:
    events = Events()
    u = Updater(tmp_path, POLICY, events=events)
    path = bundles["foreign"].path
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(UntrustedSignerError):
        u.install(str(path), sha256=sha256)
    kind, fields = events.seen[-1]
    assert kind == "failed"
    assert (fields["digest"], fields["sha256"], fields["phase"]) == (None, sha256, "verifying")


def test_a_rolled_back_event_names_the_version_rolled_back_and_the_one_now_serving(
    tmp_path: Path, bundles: dict[str, LifecycleBundle]
) -> None:
    events = Events()
    u = Updater(tmp_path, POLICY, events=events, slot=ModelSlot())
    u.install(str(bundles["v1"].path))
    candidate = u.status().pending
    assert candidate is not None
    u.rollback("breached")
    kind, fields = events.seen[-1]
    assert kind == "rolled-back"
    assert (fields["digest"], fields["current"]) == (candidate.digest, None)
