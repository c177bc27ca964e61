"""Finding dataset files: a local folder, the download cache, or a public mirror, always checksum-verified.

Where a loader looks for its files, in order:

1. the local data folder from :func:`resolve_dir` (``data_dir`` argument, else ``$FEDLOOM_DATA``); a file found
   there must match its checksum, or :class:`DataError` is raised (a local copy is never silently replaced);
2. the download cache, ``<cache_dir>/<dataset>/`` (``cache_dir`` argument, else :func:`default_cache_dir`);
3. the public mirrors, when ``download`` is true: :func:`fetch` writes into the cache.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedloom.core.errors import ConfigError, DataError

__all__ = ["default_cache_dir", "fetch", "file_digest", "obtain_files", "resolve_dir", "verify_file"]

logger = logging.getLogger("fedloom.data")

#: Environment variable naming a folder of local dataset copies (one subfolder per dataset, or the files).
ENV_DATA = "FEDLOOM_DATA"
#: Environment variable naming the download cache folder.
ENV_CACHE = "FEDLOOM_CACHE"

_CHUNK = 1 << 20
_LOCAL_HINT = (
    "To use a local copy instead, put the file in a folder and pass that folder as the loader's data_dir "
    f"(the job's or command line's data folder option), or set the {ENV_DATA} environment variable to it."
)


def default_cache_dir() -> Path:
    """The download cache: ``$FEDLOOM_CACHE`` if set and not empty, else ``~/.cache/fedloom``."""
    env = os.environ.get(ENV_CACHE, "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedloom"


def resolve_dir(data_dir: str | Path | None, dataset_subdir: str) -> Path | None:
    """The local folder that holds a dataset's files, or ``None`` to use the cache (and download).

    ``data_dir`` wins when given; otherwise ``$FEDLOOM_DATA`` is used when set. Either may hold the files
    directly or in a subfolder named ``dataset_subdir`` (preferred when it exists), so one ``FEDLOOM_DATA``
    folder can serve every dataset.

    Raises:
        DataError: the given folder (or ``$FEDLOOM_DATA``) does not exist.
    """
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise DataError(f"data folder {root} does not exist")
    else:
        env = os.environ.get(ENV_DATA, "")
        if not env:
            return None
        root = Path(env).expanduser()
        if not root.is_dir():
            raise DataError(f"data folder {root} (from ${ENV_DATA}) does not exist")
    nested = root / dataset_subdir
    return nested if nested.is_dir() else root


def file_digest(path: Path, algorithm: str) -> str:
    """The hex digest of a file's bytes (``algorithm`` is a :mod:`hashlib` name such as ``"md5"``)."""
    # md5 here identifies published files; it is not a security control, which FIPS builds need to be told.
    hasher = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def verify_file(path: Path, *, md5: str | None = None, sha256: str | None = None) -> None:
    """Check a file against its expected digest (give exactly one of ``md5`` and ``sha256``).

    Raises:
        DataError: the digest differs (the message names the file, the expected and the actual digest).
        ConfigError: neither or both digests given.
    """
    algorithm, expected = _expected(md5, sha256)
    actual = file_digest(path, algorithm)
    if actual != expected:
        raise DataError(f"{path} has {algorithm} {actual}, expected {expected}: the file is corrupt or another version")


def fetch(
    mirrors: Sequence[str],
    filename: str,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    cache_dir: str | Path | None = None,
    timeout: float = 60.0,
) -> Path:
    """Return ``<cache_dir>/<filename>``, downloading it first unless a copy with the right digest is there.

    ``mirrors`` are base URLs (``https://host/path/``) tried in turn; the file's URL is the base plus
    ``filename``. The download goes to a temporary file in ``cache_dir``, is verified, then renamed into place,
    so the cache never holds a partial or unverified file under the final name. ``cache_dir`` defaults to
    :func:`default_cache_dir` and is created if needed.

    Raises:
        DataError: the downloaded bytes have the wrong digest (the temporary file is deleted; other mirrors
            are not tried, since a digest mismatch usually means a wrong checksum or a tampered file), or
            every mirror failed (the message lists each URL and its error, and how to supply the file locally).
        ConfigError: no mirror given, or not exactly one of ``md5`` and ``sha256``.
    """
    algorithm, expected = _expected(md5, sha256)
    if not mirrors:
        raise ConfigError(f"no download address for {filename}")
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = folder / filename
    if target.is_file():
        actual = file_digest(target, algorithm)
        if actual == expected:
            return target
        logger.warning("cached %s has %s %s, expected %s; downloading it again", target, algorithm, actual, expected)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the download folder {folder}: {exc}") from exc

    failures: list[str] = []
    for base in mirrors:
        url = (base if base.endswith("/") else base + "/") + urllib.parse.quote(filename)
        logger.info("downloading %s from %s", filename, url)
        try:
            partial, actual = _download(url, folder, algorithm, timeout)
        except (OSError, http.client.HTTPException) as exc:  # URLError and timeouts are OSErrors
            logger.warning("download of %s failed: %s", url, exc)
            failures.append(f"{url} ({exc})")
            continue
        if actual != expected:
            partial.unlink(missing_ok=True)
            raise DataError(
                f"downloaded {filename} from {url} has {algorithm} {actual}, expected {expected}; the file was deleted"
            )
        os.replace(partial, target)
        logger.info("saved %s (%d bytes)", target, target.stat().st_size)
        return target
    raise DataError(f"could not download {filename} (tried {'; '.join(failures)}). {_LOCAL_HINT}")


def obtain_files(
    files: Mapping[str, str],
    *,
    dataset: str,
    data_dir: str | Path | None,
    cache_dir: str | Path | None,
    mirrors: Sequence[str],
    download: bool,
) -> dict[str, Path]:
    """Find each of a dataset's files (filename -> md5) locally, in the cache, or by downloading it.

    The local folder is ``resolve_dir(data_dir, dataset)``; the cache is ``<cache_dir>/<dataset>/``. Every
    file is located before any is downloaded, so a missing file is reported at once.

    Returns:
        The path of every file, keyed and ordered like ``files``.

    Raises:
        DataError: the local folder does not exist; a local file has the wrong digest; a file is missing from
            an explicitly given ``data_dir`` (never downloaded then), or is neither local nor cached and
            ``download`` is false (the message names every missing file); a download failed.
    """
    local = resolve_dir(data_dir, dataset)
    cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / dataset
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name, md5 in files.items():
        if local is not None and (local / name).is_file():
            verify_file(local / name, md5=md5)
            found[name] = local / name
        elif (cache / name).is_file() and file_digest(cache / name, "md5") == md5:
            found[name] = cache / name
        else:
            missing.append(name)
    if missing and data_dir is not None:
        # A folder the user named is taken at its word: going to the network instead would surprise them.
        raise DataError(
            f"{dataset}: {', '.join(missing)} not found in the data folder {local}; add the files there, "
            f"or leave out the data folder to download them into {cache}"
        )
    if missing and not download:
        places = f"{local} or {cache}" if local is not None else str(cache)
        raise DataError(f"{dataset}: {', '.join(missing)} not found in {places}, and download is off. {_LOCAL_HINT}")
    for name in missing:
        found[name] = fetch(mirrors, name, md5=files[name], cache_dir=cache)
    return {name: found[name] for name in files}


def _expected(md5: str | None, sha256: str | None) -> tuple[str, str]:
    if md5 is not None and sha256 is None:
        return "md5", md5.lower()
    if sha256 is not None and md5 is None:
        return "sha256", sha256.lower()
    raise ConfigError("give exactly one of md5 and sha256")


def _download(url: str, folder: Path, algorithm: str, timeout: float) -> tuple[Path, str]:
    """Stream ``url`` into a new temporary file in ``folder``; return its path and digest.

    The temporary file is removed if anything goes wrong.
    """
    hasher = hashlib.new(algorithm, usedforsecurity=False)
    fd, name = tempfile.mkstemp(dir=folder, prefix=".download-", suffix=".part")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(_CHUNK):
                hasher.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except BaseException as exc:
        path.unlink(missing_ok=True)
        if isinstance(exc, urllib.error.HTTPError):
            exc.close()  # it holds the open response; closing it avoids a ResourceWarning later
        raise
    return path, hasher.hexdigest()
