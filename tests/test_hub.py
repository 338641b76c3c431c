"""Tests for paadet.hub: cache location, atomic verified downloads from a local HTTP server, resolution of files and
model names."""

from __future__ import annotations

import functools
import hashlib
import io
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from paadet.checkpoint import CheckpointError, load_state_dict
from paadet.hub import (
    OFFICIAL_FILENAME,
    OFFICIAL_URL,
    cache_dir,
    default_checkpoint,
    download,
    model_checkpoint,
    resolve_checkpoint,
)
from paadet.zoo import ModelEntry, UnknownModelError, get_model, model_names

SHORT_BODY_PATH = "/short.pth"


class QuietHandler(SimpleHTTPRequestHandler):
    """Serves a folder without logging; ``/short.pth`` announces 1000 bytes and sends 10."""

    def log_message(self, fmt: str, *args: object) -> None:
        """Keep the test output clean."""

    def do_GET(self) -> None:
        if self.path == SHORT_BODY_PATH:
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"0123456789")
            return
        super().do_GET()


@dataclass
class Server:
    """A running local HTTP server: its base URL and the folder it serves."""

    url: str
    root: Path


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """An HTTP server on 127.0.0.1 (free port) serving ``tmp_path / "served"`` from a thread."""
    root = tmp_path / "served"
    root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{httpd.server_address[1]}", root)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _checkpoint_bytes() -> bytes:
    """A small valid checkpoint, serialised."""
    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.arange(6.0)}}, buffer)
    return buffer.getvalue()


def _serve_hashed(server: Server, suffix: str | None = None) -> tuple[str, bytes, str]:
    """Put a checkpoint named ``x-<suffix>.pth`` (default: its real sha256 prefix) on the server."""
    data = _checkpoint_bytes()
    digest = hashlib.sha256(data).hexdigest()
    name = f"x-{suffix or digest[:8]}.pth"
    (server.root / name).write_bytes(data)
    return name, data, digest


def _wrong_prefix(digest: str) -> str:
    """An 8-hex prefix that differs from ``digest``'s."""
    return ("1" if digest[0] == "0" else "0") + digest[1:8]


def _one_line_download_error(excinfo: pytest.ExceptionInfo[CheckpointError], url: str, dest: Path) -> str:
    """The message, after checking it is one line with the URL and the destination path."""
    message = str(excinfo.value)
    assert "\n" not in message
    assert url in message
    assert f"save it as {dest}" in message
    return message


def _closed_port() -> int:
    """A local port with nothing listening on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_official_names() -> None:
    assert OFFICIAL_URL.endswith("/" + OFFICIAL_FILENAME)
    assert OFFICIAL_FILENAME == "paa_r50_fpn_1x_coco_20200821-936edec3.pth"


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PAADET_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "paadet"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "paadet"
    monkeypatch.setenv("PAADET_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_download_success_with_hash_check(server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name, data, _ = _serve_hashed(server)
    dest = tmp_path / "cache" / "nested" / name
    assert download(f"{server.url}/{name}", dest, progress=True) == dest
    assert dest.read_bytes() == data
    assert [p.name for p in dest.parent.iterdir()] == [name]
    assert torch.equal(load_state_dict(dest)["w"], torch.arange(6.0))
    assert name in capsys.readouterr().err


def test_download_without_progress_is_silent(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, data, _ = _serve_hashed(server)
    dest = tmp_path / "plain.pth"
    download(f"{server.url}/{name}", dest, progress=False)
    assert dest.read_bytes() == data
    assert capsys.readouterr().err == ""


def test_download_hash_mismatch_leaves_no_file(server: Server, tmp_path: Path) -> None:
    data = _checkpoint_bytes()
    wrong = _wrong_prefix(hashlib.sha256(data).hexdigest())
    name, _, _ = _serve_hashed(server, suffix=wrong)
    folder = tmp_path / "cache"
    dest = folder / name
    url = f"{server.url}/{name}"
    with pytest.raises(CheckpointError) as excinfo:
        download(url, dest, progress=False)
    message = _one_line_download_error(excinfo, url, dest)
    assert "corrupt or truncated" in message and wrong in message
    assert list(folder.iterdir()) == []


def test_download_404(server: Server, tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    dest = folder / "absent.pth"
    url = f"{server.url}/absent.pth"
    with pytest.raises(CheckpointError) as excinfo:
        download(url, dest, progress=False)
    assert "HTTP 404" in _one_line_download_error(excinfo, url, dest)
    assert list(folder.iterdir()) == []


def test_failed_download_keeps_existing_file(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "kept.pth"
    dest.write_bytes(b"previous")
    with pytest.raises(CheckpointError):
        download(f"{server.url}/absent.pth", dest, progress=False)
    assert dest.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.pth", "served"]


def test_download_closed_port(tmp_path: Path) -> None:
    dest = tmp_path / "cache" / "x.pth"
    url = f"http://127.0.0.1:{_closed_port()}/x.pth"
    with pytest.raises(CheckpointError) as excinfo:
        download(url, dest, progress=False, timeout=5)
    _one_line_download_error(excinfo, url, dest)
    assert list(dest.parent.iterdir()) == []


def test_download_timeout(tmp_path: Path) -> None:
    dest = tmp_path / "slow.pth"
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/slow.pth"
        with pytest.raises(CheckpointError) as excinfo:
            download(url, dest, progress=False, timeout=0.3)
    assert "timed out after 0.3 s" in _one_line_download_error(excinfo, url, dest)
    assert list(tmp_path.iterdir()) == []


def test_download_shorter_than_content_length(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "short.pth"
    url = f"{server.url}{SHORT_BODY_PATH}"
    with pytest.raises(CheckpointError) as excinfo:
        download(url, dest, progress=False)
    assert "got 10 of 1000 bytes" in _one_line_download_error(excinfo, url, dest)
    assert list(tmp_path.iterdir()) == [server.root]


def test_default_checkpoint_uses_paadet_cache(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "my-cache"
    monkeypatch.setenv("PAADET_CACHE", str(cache))
    name, data, _ = _serve_hashed(server)
    url = f"{server.url}/{name}"
    path = default_checkpoint(url, progress=False)
    assert path == cache / name
    assert path.read_bytes() == data
    (server.root / name).unlink()
    assert default_checkpoint(url, progress=False) == path


def test_default_checkpoint_without_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAADET_CACHE", str(tmp_path))
    url = f"http://127.0.0.1:{_closed_port()}/x-0123abcd.pth"
    with pytest.raises(CheckpointError) as excinfo:
        default_checkpoint(url, download_if_missing=False)
    assert "downloading is disabled" in _one_line_download_error(excinfo, url, tmp_path / "x-0123abcd.pth")


def test_resolve_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAADET_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / OFFICIAL_FILENAME
    cached.parent.mkdir()
    cached.write_bytes(b"placeholder")
    assert resolve_checkpoint(None, download_if_missing=False) == cached
    mine = tmp_path / "mine.pth"
    mine.write_bytes(b"weights")
    assert resolve_checkpoint(str(mine)) == mine
    assert resolve_checkpoint(mine) == mine


@pytest.mark.parametrize("name", ["missing.pth", "cache"])
def test_resolve_checkpoint_rejects_non_files(tmp_path: Path, name: str) -> None:
    (tmp_path / "cache").mkdir()
    path = tmp_path / name
    with pytest.raises(CheckpointError, match="not found") as excinfo:
        resolve_checkpoint(path)
    assert str(path) in str(excinfo.value)


def test_download_onto_a_folder_fails_cleanly(server: Server, tmp_path: Path) -> None:
    name, _, _ = _serve_hashed(server)
    dest = tmp_path / "cache" / name
    dest.mkdir(parents=True)
    url = f"{server.url}/{name}"
    with pytest.raises(CheckpointError) as excinfo:
        download(url, dest, progress=False)
    assert f"cannot write {dest}" in _one_line_download_error(excinfo, url, dest)
    assert [p.name for p in dest.parent.iterdir()] == [name]


# ------------------------------------------------------------------------- model names (paadet.zoo)


def test_resolve_model_name_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAADET_CACHE", str(tmp_path / "cache"))
    entry = get_model("paa_r101_fpn_ms-3x_coco")
    cached = tmp_path / "cache" / entry.file_name
    cached.parent.mkdir()
    cached.write_bytes(b"placeholder")
    for name in (entry.name, entry.legacy_name, entry.file_name):
        assert resolve_checkpoint(name, download_if_missing=False) == cached
    assert model_checkpoint(entry.name, download_if_missing=False) == cached


def test_an_existing_file_wins_over_a_model_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAADET_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    Path("paa_r50_fpn_2x_coco").write_bytes(b"mine")
    assert resolve_checkpoint("paa_r50_fpn_2x_coco", download_if_missing=False) == Path("paa_r50_fpn_2x_coco")


def test_uncached_model_name_without_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAADET_CACHE", str(tmp_path))
    entry = get_model("paa_r50_fpn_1.5x_coco")
    with pytest.raises(CheckpointError) as excinfo:
        resolve_checkpoint(entry.name, download_if_missing=False)
    assert "downloading is disabled" in _one_line_download_error(excinfo, entry.url, tmp_path / entry.file_name)


def _served_entry(server: Server, suffix: str | None = None) -> tuple[ModelEntry, bytes]:
    """A zoo entry whose URL is a checkpoint on ``server``, under a file name in mmdetection's pattern."""
    data = _checkpoint_bytes()
    file_name = f"paa_test_fpn_1x_coco_20200101-{suffix or hashlib.sha256(data).hexdigest()[:8]}.pth"
    (server.root / file_name).write_bytes(data)
    return ModelEntry("paa_test_fpn_1x_coco", 50, "1x", 1.0, None, f"{server.url}/{file_name}"), data


def test_model_name_downloads_once(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAADET_CACHE", str(tmp_path / "cache"))
    entry, data = _served_entry(server)
    monkeypatch.setattr("paadet.hub.find_model", lambda name: entry if name == entry.name else None)
    path = resolve_checkpoint(entry.name, progress=False)
    assert path == tmp_path / "cache" / entry.file_name == entry.cached_path()
    assert path.read_bytes() == data
    (server.root / entry.file_name).unlink()  # the second call must not download again
    assert resolve_checkpoint(entry.name, progress=False) == path
    assert torch.equal(load_state_dict(path)["w"], torch.arange(6.0))


def test_model_name_download_checks_the_hash(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("PAADET_CACHE", str(cache))
    wrong = _wrong_prefix(hashlib.sha256(_checkpoint_bytes()).hexdigest())
    entry, _ = _served_entry(server, suffix=wrong)
    monkeypatch.setattr("paadet.hub.find_model", lambda name: entry if name == entry.name else None)
    with pytest.raises(CheckpointError) as excinfo:
        resolve_checkpoint(entry.name, progress=False)
    assert "corrupt or truncated" in _one_line_download_error(excinfo, entry.url, cache / entry.file_name)
    assert list(cache.iterdir()) == []


def test_unknown_model_name_lists_the_known_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PAADET_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError) as excinfo:
        resolve_checkpoint("paa_r101_fpn_3x_coco")
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith("paa_r101_fpn_3x_coco: checkpoint file not found")
    assert all(name in message for name in model_names())
    with pytest.raises(UnknownModelError, match="paa_r101_fpn_ms-3x_coco"):
        model_checkpoint("paa_r101_fpn_3x_coco")
    assert not (tmp_path / "cache").exists()
