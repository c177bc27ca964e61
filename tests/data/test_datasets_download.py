"""Finding and downloading dataset files: a loopback HTTP server stands in for the public mirrors."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedloom.core.errors import ConfigError, DataError
from fedloom.data.datasets import download
from fedloom.data.datasets.download import default_cache_dir, fetch, obtain_files, resolve_dir, verify_file
from fedloom.data.datasets.mnist import FILES as MNIST_FILES

PAYLOAD = b"fedloom test payload\n" * 100
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on a free loopback port, and its base URL; stopped after the test."""
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def dead_url() -> str:
    """A loopback URL where nothing listens (the port was free a moment ago), so connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDLOOM_DATA", raising=False)
    monkeypatch.delenv("FEDLOOM_CACHE", raising=False)


def test_fetch_downloads_verifies_and_leaves_only_the_file(server: tuple[Path, str], tmp_path: Path) -> None:
    root, url = server
    (root / "blob.bin").write_bytes(PAYLOAD)
    cache = tmp_path / "cache" / "deep"
    path = fetch([url], "blob.bin", md5=PAYLOAD_MD5, cache_dir=cache)
    assert path == cache / "blob.bin"
    assert path.read_bytes() == PAYLOAD
    assert [p.name for p in cache.iterdir()] == ["blob.bin"]


def test_fetch_uses_a_valid_cached_copy_without_the_network(tmp_path: Path, dead_url: str) -> None:
    (tmp_path / "blob.bin").write_bytes(PAYLOAD)
    assert fetch([dead_url], "blob.bin", sha256=PAYLOAD_SHA256, cache_dir=tmp_path) == tmp_path / "blob.bin"


def test_fetch_replaces_a_corrupt_cached_copy(server: tuple[Path, str], tmp_path: Path) -> None:
    root, url = server
    (root / "blob.bin").write_bytes(PAYLOAD)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "blob.bin").write_bytes(b"stale")
    assert fetch([url], "blob.bin", md5=PAYLOAD_MD5, cache_dir=cache).read_bytes() == PAYLOAD


def test_fetch_tries_the_mirrors_in_turn(server: tuple[Path, str], tmp_path: Path, dead_url: str) -> None:
    root, url = server
    (root / "blob.bin").write_bytes(PAYLOAD)
    # a refused connection, then a 404 (the file is under another folder), then the good mirror
    path = fetch([dead_url, url + "missing/", url.rstrip("/")], "blob.bin", md5=PAYLOAD_MD5, cache_dir=tmp_path)
    assert path.read_bytes() == PAYLOAD


def test_fetch_checksum_mismatch_raises_and_leaves_no_partial_file(server: tuple[Path, str], tmp_path: Path) -> None:
    root, url = server
    (root / "blob.bin").write_bytes(PAYLOAD + b"tampered")
    cache = tmp_path / "cache"
    wrong = hashlib.md5(PAYLOAD + b"tampered").hexdigest()
    with pytest.raises(DataError) as info:
        fetch([url], "blob.bin", md5=PAYLOAD_MD5, cache_dir=cache)
    message = str(info.value)
    assert "blob.bin" in message
    assert PAYLOAD_MD5 in message
    assert wrong in message
    assert list(cache.iterdir()) == []


def test_fetch_failing_everywhere_lists_the_urls_and_the_local_way(
    server: tuple[Path, str], tmp_path: Path, dead_url: str
) -> None:
    _, url = server  # serves an empty folder: 404
    with pytest.raises(DataError) as info:
        fetch([dead_url, url], "blob.bin", md5=PAYLOAD_MD5, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert f"{dead_url}blob.bin" in message
    assert f"{url}blob.bin" in message
    assert "FEDLOOM_DATA" in message
    assert "data_dir" in message
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "mirrors"),
    [
        ({}, ["http://127.0.0.1:1/"]),
        ({"md5": PAYLOAD_MD5, "sha256": PAYLOAD_SHA256}, ["http://127.0.0.1:1/"]),
        ({"md5": PAYLOAD_MD5}, []),
    ],
)
def test_fetch_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], mirrors: list[str]) -> None:
    with pytest.raises(ConfigError):
        fetch(mirrors, "blob.bin", cache_dir=tmp_path, **kwargs)


def test_verify_file(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(PAYLOAD)
    verify_file(path, md5=PAYLOAD_MD5.upper())
    verify_file(path, sha256=PAYLOAD_SHA256)
    with pytest.raises(DataError, match=r"blob\.bin.*expected 0{32}"):
        verify_file(path, md5="0" * 32)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert default_cache_dir() == Path.home() / ".cache" / "fedloom"
    monkeypatch.setenv("FEDLOOM_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path


def test_resolve_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert resolve_dir(None, "mnist") is None
    assert resolve_dir(tmp_path, "mnist") == tmp_path
    (tmp_path / "mnist").mkdir()
    assert resolve_dir(str(tmp_path), "mnist") == tmp_path / "mnist"
    with pytest.raises(DataError, match="does not exist"):
        resolve_dir(tmp_path / "nope", "mnist")

    monkeypatch.setenv("FEDLOOM_DATA", str(tmp_path))
    assert resolve_dir(None, "mnist") == tmp_path / "mnist"
    assert resolve_dir(None, "heart_disease") == tmp_path
    monkeypatch.setenv("FEDLOOM_DATA", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="FEDLOOM_DATA"):
        resolve_dir(None, "mnist")


def test_obtain_files_prefers_local_then_cache_then_download(
    monkeypatch: pytest.MonkeyPatch, server: tuple[Path, str], tmp_path: Path
) -> None:
    root, url = server
    files = {"a.bin": hashlib.md5(b"a").hexdigest(), "b.bin": hashlib.md5(b"b").hexdigest()}
    local, cache = tmp_path / "local", tmp_path / "cache"
    local.mkdir()
    (local / "a.bin").write_bytes(b"a")
    (root / "b.bin").write_bytes(b"b")
    common: dict[str, Any] = {"dataset": "toy", "cache_dir": cache, "mirrors": [url]}

    # A folder given explicitly is taken at its word: a file missing there is an error, never a download.
    for may_download in (False, True):
        with pytest.raises(DataError, match=r"b\.bin not found in the data folder") as info:
            obtain_files(files, data_dir=local, download=may_download, **common)
        assert "a.bin" not in str(info.value)
    assert not (cache / "toy" / "b.bin").exists()

    # Through FEDLOOM_DATA the folder is the first place to look; what is missing there is downloaded.
    monkeypatch.setenv("FEDLOOM_DATA", str(local))
    paths = obtain_files(files, data_dir=None, download=True, **common)
    assert paths == {"a.bin": local / "a.bin", "b.bin": cache / "toy" / "b.bin"}
    # now cached: found without downloading
    assert obtain_files(files, data_dir=None, download=False, **common) == paths

    (local / "a.bin").write_bytes(b"tampered")
    with pytest.raises(DataError, match=files["a.bin"]):
        obtain_files(files, data_dir=local, download=True, **common)


def test_fetch_real_mnist_test_files_over_loopback(shared_data: Path, server: tuple[Path, str], tmp_path: Path) -> None:
    root, url = server
    names = ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    for name in names:
        shutil.copy(shared_data / "mnist" / name, root / name)
    for name in names:
        path = fetch([url], name, md5=MNIST_FILES[name], cache_dir=tmp_path / "cache")
        assert path.read_bytes() == (shared_data / "mnist" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == names


def test_download_logs_a_line(server: tuple[Path, str], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root, url = server
    (root / "blob.bin").write_bytes(PAYLOAD)
    with caplog.at_level("INFO", logger=download.logger.name):
        fetch([url], "blob.bin", md5=PAYLOAD_MD5, cache_dir=tmp_path)
    assert any("downloading blob.bin" in r.getMessage() for r in caplog.records)
