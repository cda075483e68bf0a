"""Download a MovieLens release from GroupLens, verify its md5 and extract it safely.

`fetch("ml-25m", data_dir)` returns `data_dir/ml-25m` and touches the network only when the
release's files are not already there. Downloads resume from `<name>.zip.part`, are checked
against the release's md5 before anything is extracted, and the archive is extracted into a
temporary directory that is moved into place only once every member has been checked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import pathlib
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile

from tqdm import tqdm

from onerec_jax.errors import UserError

_BASE_URL = "https://files.grouplens.org/datasets/movielens/"
_CHUNK = 1 << 20  # bytes per read, both from the network and when hashing
_USER_AGENT = "onerec_jax-download/1.0"


class DownloadError(UserError, RuntimeError):
    """A release could not be fetched, verified or extracted; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Release:
    """One MovieLens zip: where it lives, how to verify it, and what it must contain."""

    name: str  # registry key and zip file stem, e.g. "ml-25m"
    url: str  # the zip's URL
    md5: str | None  # hex md5 of the zip; None to read it from `md5_url`
    folder: str  # top-level directory inside the zip, e.g. "ml-25m" or "ml-10M100K"
    files: tuple[str, ...]  # files inside `folder` that must exist for the release to count
    md5_url: str | None = None  # the `.md5` file GroupLens publishes beside the zip

    def __post_init__(self) -> None:
        if self.md5 is None and self.md5_url is None:
            raise ValueError(f"Release {self.name!r} needs an md5 or an md5_url to verify it.")


def _grouplens(name: str, md5: str | None, files: tuple[str, ...], folder: str = "") -> Release:
    url = f"{_BASE_URL}{name}.zip"
    md5_url = None if md5 else f"{url}.md5"
    return Release(name, url, md5, folder or name, files, md5_url)


_CSV = ("ratings.csv", "movies.csv")
_DAT = ("ratings.dat", "movies.dat")
RELEASES: dict[str, Release] = {
    r.name: r
    for r in (
        _grouplens("ml-100k", "0e33842e24a9c977be4e0107933c0723", ("u.data", "u.item")),
        _grouplens("ml-1m", "c4d9eecfca2ab87c1945afe126590906", _DAT),
        _grouplens("ml-10m", "ce571fd55effeba0271552578f2648bd", _DAT, folder="ml-10M100K"),
        _grouplens("ml-20m", "cd245b17a1ae2cc31bb14903e1204af3", _CSV),
        _grouplens("ml-25m", "6b51fb2759a8657d3bfcbfc42b592ada", _CSV),
        _grouplens("ml-32m", None, _CSV),
        _grouplens("ml-latest-small", None, _CSV),
        _grouplens("ml-latest", None, _CSV),
    )
}


def is_present(release: Release, data_dir: str | os.PathLike) -> bool:
    """Whether every file of `release` already exists in `data_dir/<release.folder>`."""
    folder = pathlib.Path(data_dir) / release.folder
    return all((folder / name).is_file() for name in release.files)


def fetch(
    release: Release | str,
    data_dir: str | os.PathLike,
    *,
    progress: bool = True,
    timeout: float = 30,
) -> pathlib.Path:
    """Make sure `release` is extracted under `data_dir`, downloading it only if needed.

    Args:
        release: a `Release`, or the name of one in `RELEASES` (e.g. "ml-25m").
        data_dir: directory that holds `<name>.zip` and the extracted folder.
        progress: show a tqdm progress bar while downloading.
        timeout: seconds to wait on each network connect or read.

    Returns:
        The extracted folder, `data_dir/<release.folder>`.

    Raises:
        DownloadError: the network is unreachable (the message says which URL to fetch by
            hand and where to save it), the checksum does not match, the transfer broke off
            (run again to resume), or the archive is unsafe or lacks the release's files.
    """
    if isinstance(release, str):
        if release not in RELEASES:
            raise DownloadError(f"Unknown MovieLens release {release!r}; known: {list(RELEASES)}.")
        release = RELEASES[release]
    data_dir = pathlib.Path(data_dir)
    target = data_dir / release.folder
    if is_present(release, data_dir):
        return target
    data_dir.mkdir(parents=True, exist_ok=True)
    zip_path = data_dir / f"{release.name}.zip"
    if zip_path.is_file():
        _check_local_zip(release, zip_path, timeout)
    else:
        _download(release, zip_path, progress, timeout)
    _extract(release, zip_path, data_dir)
    return target


def _manual_hint(release: Release, zip_path: pathlib.Path) -> str:
    return f"To install it by hand, download {release.url} and save it as {zip_path}."


def _unreachable(
    url: str, release: Release, zip_path: pathlib.Path, err: Exception
) -> DownloadError:
    reason = getattr(err, "reason", err)
    return DownloadError(f"Could not reach {url} ({reason}). {_manual_hint(release, zip_path)}")


def _md5_of(path: pathlib.Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _expected_md5(
    release: Release, zip_path: pathlib.Path, timeout: float, *, offline_ok: bool = False
) -> str | None:
    """The release's md5, read from `release.md5_url` when it is not in the registry.

    Returns None only when `offline_ok` and the md5 URL is unreachable.
    """
    if release.md5 is not None:
        return release.md5.lower()
    try:
        with urllib.request.urlopen(_request(release.md5_url), timeout=timeout) as response:
            text = response.read(4096).decode("ascii", errors="replace")
    except urllib.error.HTTPError as err:
        raise DownloadError(
            f"{release.md5_url} answered HTTP {err.code}; cannot verify {release.url}."
        ) from err
    except (urllib.error.URLError, OSError) as err:
        if offline_ok:
            return None
        raise _unreachable(release.md5_url, release, zip_path, err) from err
    match = re.search(r"\b[0-9a-fA-F]{32}\b", text)
    if match is None:
        raise DownloadError(f"{release.md5_url} holds no md5 checksum (got {text[:80]!r}).")
    return match.group(0).lower()


def _check_local_zip(release: Release, zip_path: pathlib.Path, timeout: float) -> None:
    """Verify a zip that is already on disk (downloaded earlier or placed there by hand)."""
    expected = _expected_md5(release, zip_path, timeout, offline_ok=True)
    if expected is None:
        warnings.warn(
            f"Cannot fetch {release.md5_url} to verify {zip_path}; using it unverified.",
            stacklevel=3,
        )
        return
    actual = _md5_of(zip_path)
    if actual != expected:
        raise DownloadError(
            f"{zip_path} has md5 {actual}, expected {expected} for {release.url}. The file is "
            "corrupt or a different release; delete it and run again to re-download."
        )


def _request(url: str, offset: int = 0) -> urllib.request.Request:
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.Request(url, headers=headers)


def _open(
    release: Release, zip_path: pathlib.Path, offset: int, timeout: float
) -> http.client.HTTPResponse | None:
    """Open the zip's URL from byte `offset`; None when the server answers 416 (bad range)."""
    try:
        return urllib.request.urlopen(_request(release.url, offset), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            return None
        hint = _manual_hint(release, zip_path)
        raise DownloadError(f"{release.url} answered HTTP {err.code} {err.reason}. {hint}") from err
    except (urllib.error.URLError, OSError) as err:
        raise _unreachable(release.url, release, zip_path, err) from err


def _download(release: Release, zip_path: pathlib.Path, progress: bool, timeout: float) -> None:
    """Download (or resume) into `<zip>.part`, verify its md5, then move it to `zip_path`."""
    expected = _expected_md5(release, zip_path, timeout)
    part = zip_path.with_name(zip_path.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    response = _open(release, zip_path, offset, timeout)
    if response is None:  # 416: the part is already complete or overlong, start again clean
        part.unlink()
        offset = 0
        response = _open(release, zip_path, offset, timeout)
    if response.status != 206:  # 200: the server ignores Range and sends the whole file
        offset = 0
    length = response.headers.get("Content-Length")
    total = offset + int(length) if length is not None else None
    size, failure = offset, ""
    bar = tqdm(
        total=total,
        initial=size,
        unit="B",
        unit_scale=True,
        desc=release.name,
        disable=not progress,
    )
    try:
        with response, bar, open(part, "ab" if offset else "wb") as f:
            while chunk := response.read(_CHUNK):
                f.write(chunk)
                size += len(chunk)
                bar.update(len(chunk))
    except OSError as err:  # socket timeouts and connection resets
        failure = f" ({err})"
    if failure or (total is not None and size < total):
        raise DownloadError(
            f"Download of {release.url} broke off after {size} of {total or '?'} bytes{failure}; "
            f"run again to resume from {part}. {_manual_hint(release, zip_path)}"
        )
    actual = _md5_of(part)
    if actual != expected:
        part.unlink()
        raise DownloadError(
            f"Checksum mismatch for {release.url}: expected md5 {expected}, got md5 {actual}. "
            "The download is corrupt or was tampered with; it was deleted, run again to retry."
        )
    os.replace(part, zip_path)


def _unsafe_reason(member: str) -> str | None:
    """Why extracting a zip member named `member` could write outside its directory."""
    name = member.replace("\\", "/")
    if name.startswith("/"):
        return "an absolute path"
    if re.match(r"[A-Za-z]:", name):
        return "a drive letter"
    if ".." in name.split("/"):
        return "a '..' component"
    return None


def _extract(release: Release, zip_path: pathlib.Path, data_dir: pathlib.Path) -> None:
    """Check every member, extract into a temp dir, then move the folder into place."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as err:
        raise DownloadError(
            f"{zip_path} is not a readable zip ({err}); delete it and run again."
        ) from err
    with archive:
        for member in archive.namelist():
            reason = _unsafe_reason(member)
            if reason is not None:
                raise DownloadError(
                    f"Refusing to extract {zip_path}: member {member!r} has {reason}, "
                    "which could write outside the data directory. Nothing was extracted."
                )
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{release.name}-extract-", dir=data_dir))
        try:
            archive.extractall(tmp)
            source = tmp / release.folder
            if not is_present(release, tmp):
                missing = [
                    f"{release.folder}/{f}" for f in release.files if not (source / f).is_file()
                ]
                raise DownloadError(
                    f"{zip_path} lacks {', '.join(missing)}; it is not the {release.name} "
                    "release. Delete it and run again."
                )
            target = data_dir / release.folder
            if not target.exists():
                os.replace(source, target)
            else:  # a partial folder: refresh the archive's files, keep anything else
                for path in sorted(source.rglob("*")):
                    if path.is_file():
                        dest = target / path.relative_to(source)
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        os.replace(path, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
