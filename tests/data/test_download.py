"""Tests for onerec_jax.data.download against a real local HTTP server (no urllib mocks)."""

from __future__ import annotations

import hashlib
import http.server
import io
import pathlib
import re
import socket
import threading
import zipfile

import pytest

from onerec_jax.data.download import RELEASES, DownloadError, Release, fetch

RATINGS = b"userId,movieId,rating,timestamp\n" + b"".join(
    b"%d,%d,%.1f,%d\n" % (u, m, (u * m) % 5 + 1, 1_000_000 + u * 100 + m)
    for u in range(1, 41)
    for m in range(1, 26)
)
MOVIES = b"movieId,title,genres\n1,Toy Story (1995),Animation|Children\n2,Heat (1995),Action\n"
GOOD_MEMBERS = {"ml-test/ratings.csv": RATINGS, "ml-test/movies.csv": MOVIES}
ZIP_PATH = "/ml-test.zip"


class _Server:
    """A local HTTP server that serves byte strings, honours Range, and can cut a transfer."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}  # URL path -> body
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header) per GET
        self.cut_next: set[str] = set()  # paths whose next transfer stops half-way
        self.ignore_range = False  # answer 200 with the whole body even when asked for a range
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                range_header = self.headers.get("Range")
                server.requests.append((self.path, range_header))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start, status = 0, 200
                if range_header and not server.ignore_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                payload = body[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                if self.path in server.cut_next:  # full Content-Length, half the bytes, hang up
                    server.cut_next.discard(self.path)
                    payload = payload[: len(payload) // 2]
                    self.close_connection = True
                self.wfile.write(payload)

        return Handler


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def server():
    srv = _Server()
    yield srv
    srv.stop()


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data)
    return buffer.getvalue()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _release(url: str, md5: str | None, md5_url: str | None = None) -> Release:
    return Release(
        name="ml-test",
        url=url,
        md5=md5,
        folder="ml-test",
        files=("ratings.csv", "movies.csv"),
        md5_url=md5_url,
    )


def _listing(root: pathlib.Path) -> list[str]:
    """Every file and directory under `root`, as sorted POSIX relative paths."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{ZIP_PATH}"


EXTRACTED = ["ml-test", "ml-test.zip", "ml-test/movies.csv", "ml-test/ratings.csv"]


def _assert_extracted(folder: pathlib.Path) -> None:
    assert (folder / "ratings.csv").read_bytes() == RATINGS
    assert (folder / "movies.csv").read_bytes() == MOVIES


def test_clean_download(server: _Server, tmp_path: pathlib.Path) -> None:
    body = _zip_bytes(GOOD_MEMBERS)
    server.files[ZIP_PATH] = body
    data_dir = tmp_path / "data"
    release = _release(server.url(ZIP_PATH), _md5(body))

    folder = fetch(release, data_dir, progress=True, timeout=5)

    assert folder == data_dir / "ml-test"
    _assert_extracted(folder)
    assert _listing(data_dir) == EXTRACTED  # no .part, no temp extraction dirs
    assert (data_dir / "ml-test.zip").read_bytes() == body
    assert server.requests == [(ZIP_PATH, None)]
    assert fetch(release, data_dir, progress=False) == folder
    assert server.requests == [(ZIP_PATH, None)]  # second call stays offline


def test_cut_transfer_resumes_with_range(server: _Server, tmp_path: pathlib.Path) -> None:
    body = _zip_bytes(GOOD_MEMBERS)
    half = len(body) // 2
    server.files[ZIP_PATH] = body
    server.cut_next.add(ZIP_PATH)
    data_dir = tmp_path / "data"
    release = _release(server.url(ZIP_PATH), _md5(body))

    with pytest.raises(DownloadError, match=f"broke off after {half} of {len(body)} bytes"):
        fetch(release, data_dir, progress=False, timeout=5)
    assert _listing(data_dir) == ["ml-test.zip.part"]
    assert (data_dir / "ml-test.zip.part").read_bytes() == body[:half]

    _assert_extracted(fetch(release, data_dir, progress=False, timeout=5))
    assert server.requests == [(ZIP_PATH, None), (ZIP_PATH, f"bytes={half}-")]
    assert _listing(data_dir) == EXTRACTED
    assert (data_dir / "ml-test.zip").read_bytes() == body


def test_server_without_range_support_restarts(server: _Server, tmp_path: pathlib.Path) -> None:
    body = _zip_bytes(GOOD_MEMBERS)
    server.files[ZIP_PATH] = body
    server.ignore_range = True
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "ml-test.zip.part").write_bytes(b"stale bytes that must not be kept")

    _assert_extracted(fetch(_release(server.url(ZIP_PATH), _md5(body)), data_dir, progress=False))
    assert server.requests == [(ZIP_PATH, "bytes=33-")]
    assert (data_dir / "ml-test.zip").read_bytes() == body
    assert _listing(data_dir) == EXTRACTED


def test_overlong_part_gets_416_and_restarts_clean(server: _Server, tmp_path: pathlib.Path) -> None:
    body = _zip_bytes(GOOD_MEMBERS)
    server.files[ZIP_PATH] = body
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "ml-test.zip.part").write_bytes(body + b"junk")

    _assert_extracted(fetch(_release(server.url(ZIP_PATH), _md5(body)), data_dir, progress=False))
    assert server.requests == [(ZIP_PATH, f"bytes={len(body) + 4}-"), (ZIP_PATH, None)]
    assert _listing(data_dir) == EXTRACTED


def test_wrong_checksum_deletes_download(server: _Server, tmp_path: pathlib.Path) -> None:
    body = _zip_bytes(GOOD_MEMBERS)
    server.files[ZIP_PATH] = body
    data_dir = tmp_path / "data"
    url = server.url(ZIP_PATH)

    with pytest.raises(DownloadError) as info:
        fetch(_release(url, "0" * 32), data_dir, progress=False)
    message = str(info.value)
    assert "md5" in message and "0" * 32 in message and _md5(body) in message and url in message
    assert "retry" in message
    assert _listing(data_dir) == []  # no folder, no .part, no zip, no temp dirs


@pytest.mark.parametrize(
    "member",
    ["../evil.txt", "ml-test/../../evil.txt", "ABSOLUTE", "C:/evil.txt", "ml-test\\..\\evil.txt"],
)
def test_unsafe_member_refuses_whole_archive(
    server: _Server, tmp_path: pathlib.Path, member: str
) -> None:
    if member == "ABSOLUTE":
        member = (tmp_path / "abs_evil.txt").as_posix()
    body = _zip_bytes({**GOOD_MEMBERS, member: b"pwned\n"})
    assert member in zipfile.ZipFile(io.BytesIO(body)).namelist()
    server.files[ZIP_PATH] = body
    data_dir = tmp_path / "data"

    with pytest.raises(DownloadError, match=re.escape(repr(member))):
        fetch(_release(server.url(ZIP_PATH), _md5(body)), data_dir, progress=False)
    assert _listing(data_dir) == ["ml-test.zip"]  # nothing extracted, no temp dirs
    assert _listing(tmp_path) == ["data", "data/ml-test.zip"]  # nothing written outside


def test_files_present_means_no_network(server: _Server, tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "ml-test"
    folder.mkdir()
    (folder / "ratings.csv").write_bytes(RATINGS)
    (folder / "movies.csv").write_bytes(MOVIES)

    assert fetch(_release(server.url(ZIP_PATH), "0" * 32), tmp_path) == folder
    assert fetch(_release(_closed_port_url(), "0" * 32), tmp_path) == folder
    assert server.requests == []
    assert _listing(tmp_path) == ["ml-test", "ml-test/movies.csv", "ml-test/ratings.csv"]


def test_partial_folder_is_completed_and_user_files_kept(
    server: _Server, tmp_path: pathlib.Path
) -> None:
    body = _zip_bytes(GOOD_MEMBERS)
    server.files[ZIP_PATH] = body
    folder = tmp_path / "ml-test"
    folder.mkdir()
    (folder / "ratings.csv").write_bytes(RATINGS[:10])  # truncated copy, movies.csv missing
    (folder / "notes.txt").write_bytes(b"mine\n")

    fetch(_release(server.url(ZIP_PATH), _md5(body)), tmp_path, progress=False)
    _assert_extracted(folder)
    assert (folder / "notes.txt").read_bytes() == b"mine\n"
    assert _listing(tmp_path) == sorted([*EXTRACTED, "ml-test/notes.txt"])


@pytest.mark.parametrize("use_md5_url", [False, True])
def test_unreachable_names_url_and_target_path(tmp_path: pathlib.Path, use_md5_url: bool) -> None:
    url = _closed_port_url()
    release = _release(url, None, url + ".md5") if use_md5_url else _release(url, "0" * 32)
    data_dir = tmp_path / "data"

    with pytest.raises(DownloadError) as info:
        fetch(release, data_dir, progress=False, timeout=2)
    message = str(info.value)
    assert f"download {url} and save it as {data_dir / 'ml-test.zip'}" in message
    assert _listing(data_dir) == []


@pytest.mark.parametrize("md5_file", ["{md5}  ml-test.zip\n", "{md5}", "MD5 (ml-test.zip) = {md5}"])
def test_md5_from_md5_url(server: _Server, tmp_path: pathlib.Path, md5_file: str) -> None:
    body = _zip_bytes(GOOD_MEMBERS)
    server.files[ZIP_PATH] = body
    server.files[ZIP_PATH + ".md5"] = md5_file.format(md5=_md5(body).upper()).encode()
    release = _release(server.url(ZIP_PATH), None, server.url(ZIP_PATH + ".md5"))

    _assert_extracted(fetch(release, tmp_path, progress=False))
    assert [path for path, _ in server.requests] == [ZIP_PATH + ".md5", ZIP_PATH]


def test_wrong_md5_from_md5_url_is_rejected(server: _Server, tmp_path: pathlib.Path) -> None:
    body = _zip_bytes(GOOD_MEMBERS)
    server.files[ZIP_PATH] = body
    server.files[ZIP_PATH + ".md5"] = b"f" * 32 + b"  ml-test.zip\n"
    release = _release(server.url(ZIP_PATH), None, server.url(ZIP_PATH + ".md5"))

    with pytest.raises(DownloadError, match=f"expected md5 {'f' * 32}, got md5 {_md5(body)}"):
        fetch(release, tmp_path, progress=False)
    assert _listing(tmp_path) == []


def test_manually_placed_zip_is_used_offline(tmp_path: pathlib.Path) -> None:
    body = _zip_bytes(GOOD_MEMBERS)
    (tmp_path / "ml-test.zip").write_bytes(body)
    url = _closed_port_url()

    _assert_extracted(fetch(_release(url, _md5(body)), tmp_path, progress=False))
    assert _listing(tmp_path) == EXTRACTED


def test_manually_placed_zip_with_wrong_md5_is_kept_and_reported(tmp_path: pathlib.Path) -> None:
    body = _zip_bytes(GOOD_MEMBERS)
    (tmp_path / "ml-test.zip").write_bytes(body)

    with pytest.raises(DownloadError, match=f"has md5 {_md5(body)}, expected {'0' * 32}"):
        fetch(_release(_closed_port_url(), "0" * 32), tmp_path, progress=False)
    assert _listing(tmp_path) == ["ml-test.zip"]


def test_manually_placed_zip_unverifiable_offline_warns(tmp_path: pathlib.Path) -> None:
    body = _zip_bytes(GOOD_MEMBERS)
    (tmp_path / "ml-test.zip").write_bytes(body)
    url = _closed_port_url()

    with pytest.warns(UserWarning, match="unverified"):
        folder = fetch(_release(url, None, url + ".md5"), tmp_path, progress=False, timeout=2)
    _assert_extracted(folder)


def test_zip_without_release_files_is_rejected(server: _Server, tmp_path: pathlib.Path) -> None:
    body = _zip_bytes({"ml-test/ratings.csv": RATINGS})
    server.files[ZIP_PATH] = body

    with pytest.raises(DownloadError, match="lacks ml-test/movies.csv"):
        fetch(_release(server.url(ZIP_PATH), _md5(body)), tmp_path, progress=False)
    assert _listing(tmp_path) == ["ml-test.zip"]


def test_unknown_release_name(tmp_path: pathlib.Path) -> None:
    with pytest.raises(DownloadError, match="'ml-999m'.*ml-25m"):
        fetch("ml-999m", tmp_path)


def test_registry() -> None:
    names = ["ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "ml-32m", "ml-latest-small"]
    assert sorted(RELEASES) == sorted([*names, "ml-latest"])
    known = {
        "ml-100k": "0e33842e24a9c977be4e0107933c0723",
        "ml-1m": "c4d9eecfca2ab87c1945afe126590906",
        "ml-10m": "ce571fd55effeba0271552578f2648bd",
        "ml-20m": "cd245b17a1ae2cc31bb14903e1204af3",
        "ml-25m": "6b51fb2759a8657d3bfcbfc42b592ada",
    }
    for name, release in RELEASES.items():
        assert release.name == name
        assert release.url == f"https://files.grouplens.org/datasets/movielens/{name}.zip"
        assert release.md5 == known.get(name)
        assert release.md5_url == (None if name in known else release.url + ".md5")
    assert RELEASES["ml-10m"].folder == "ml-10M100K"
    assert RELEASES["ml-25m"].folder == "ml-25m"
    assert RELEASES["ml-25m"].files == ("ratings.csv", "movies.csv")
    assert RELEASES["ml-100k"].files == ("u.data", "u.item")
    assert RELEASES["ml-1m"].files == RELEASES["ml-10m"].files == ("ratings.dat", "movies.dat")
