"""One way to reach files: a local path or a pyarrow filesystem URI (``s3://``, ``gs://``, ``file://``).

:func:`resolve` turns what a user typed into a :class:`Location` (a filesystem and a
path on it); everything else goes through its few methods, so local folders and
object stores behave the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import re
import stat
import urllib.parse
from dataclasses import dataclass
from typing import BinaryIO, Callable, Sequence

import pyarrow as pa
import pyarrow.fs as pafs


def display_path(path: str) -> str:
    """A file name that is valid UTF-8 for Parquet and CSV: undecodable bytes become ``\\xNN``."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


#: the suffix of the temporary file :meth:`Location.write_bytes` writes before its rename
_TEMP_SUFFIX = re.compile(r"\.tmp\d+\Z")


def temp_file_of(name: str) -> str | None:
    """The file name whose :meth:`Location.write_bytes` temporary file ``name`` is (a kill
    mid-write leaves it behind), or None when ``name`` is no such file."""
    base = _TEMP_SUFFIX.sub("", name)
    return base if base != name and base else None


def undisplay_path(shown: str) -> str:
    """The local path :func:`display_path` made ``shown`` from: each ``\\xNN`` of a byte
    above 0x7f back to that byte (surrogate-escaped, as ``os.fsdecode`` gives it). A name that
    holds such text literally is found as it is first (see the callers)."""
    return re.sub(r"\\x([89a-f][0-9a-f])", lambda m: chr(0xDC00 + int(m.group(1), 16)), shown)


_SECRET_QUERY_KEYS = ("access_key", "secret_key", "session_token")
#: Schemes whose user-info position holds a container name (container@account), not a login.
_CONTAINER_AT_ACCOUNT = ("abfs", "abfss", "az")


def redact_uri(uri: str) -> str:
    """``uri`` without credentials (user info, secret query values), for files people share."""
    if not is_uri(uri):
        return uri
    parts = urllib.parse.urlsplit(uri)
    netloc = "***@" + parts.netloc.rsplit("@", 1)[-1] if "@" in parts.netloc else parts.netloc
    # The query as written (not decoded and re-encoded): only the secrets' values change.
    keys = "|".join(_SECRET_QUERY_KEYS)
    query = re.sub(rf"(^|&)({keys})=[^&]*", r"\1\2=***", parts.query, flags=re.I)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


#: A URI inside running text: up to a space, a quote or a bracket that would close it.
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`()\[\]]+")
#: What may be user info in running text: anything up to an '@' after '://', not past a space,
#: a quote or the next URI. Looser than a URI parser on purpose: a secret key holding '/', '+'
#: or '(' (AWS keys often do) typed unescaped does not parse, and must not be printed either.
_USER_INFO_IN_TEXT = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)(?:(?!://)[^\s'\"<>`@])*@")


def redact_text(text: str) -> str:
    """``text`` (a message, a log line) with the credentials of every URI in it blanked: user
    info (over-blanking a path that holds an '@' is the lesser harm) and secret query values."""
    if "://" not in text:
        return text
    text = _USER_INFO_IN_TEXT.sub(r"\1***@", text)
    return _URI_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text)


def uri_without_credentials(uri: str) -> str:
    """``uri`` with no user info at all and secret query values blanked: what names a folder
    whoever reads it, with a key in the URI, another key, or one in the environment."""
    redacted = redact_uri(uri)
    if not is_uri(redacted):
        return redacted
    # One spelling per folder: no trailing '/' before the options and the options in one
    # order, so `s3://b/d/?region=x&scheme=http` and `s3://b/d?scheme=http&region=x` are one
    # data folder for a run's record (both name the same objects).
    parts = urllib.parse.urlsplit(redacted)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    if parts.scheme.lower() in _CONTAINER_AT_ACCOUNT:
        netloc = urllib.parse.urlsplit(uri).netloc  # (Azure: container@account, no login: kept)
    path = parts.path.rstrip("/") if parts.path.strip("/") else ""
    # options compared decoded: `endpoint_override=m%3A9000` is `m:9000`
    query = "&".join(sorted(urllib.parse.unquote(q) for q in parts.query.split("&") if q))
    return urllib.parse.urlunsplit((parts.scheme, netloc, path, query, parts.fragment))


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` strings (``s3://``, ``file://``...), false for plain paths."""
    return "://" in path


def join_uri(path_or_uri: str, *parts: str) -> str:
    """``parts`` (``/``-separated) joined onto a local path, or into a URI's path.

    In a URI they go before its query (``?endpoint_override=...``), percent-encoded: pyarrow
    decodes a URI's path, so a name holding '%', '?' or '#' would otherwise name another object
    (or options) when the URI is resolved again. A string operation: nothing is resolved.
    """
    if not is_uri(path_or_uri):
        return os.path.join(path_or_uri, *parts)
    split = urllib.parse.urlsplit(path_or_uri)
    # (RFC 3986's sub-delimiters stay as typed: run names may hold them)
    quoted = [urllib.parse.quote(p.encode("utf-8", "surrogateescape"), safe="/!$&'()*+,;=:@~") for p in parts]
    return urllib.parse.urlunsplit(split._replace(path=posixpath.join(split.path, *quoted)))


def folder_name(path: str) -> str:
    """The last folder of a path, or of a URI's path (not of its ``?options``), unescaped."""
    if is_uri(path):
        split = urllib.parse.urlsplit(path)
        path = urllib.parse.unquote(split.path).rstrip("/") or split.netloc  # a bucket's root: the bucket
    return os.path.basename(path.rstrip("/"))


@dataclass(frozen=True)
class Location:
    """A path on a pyarrow filesystem, with the string the user would recognise."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_local(self) -> bool:
        """True when the path is on this machine's file system."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    def join(self, *parts: str) -> "Location":
        """A child location; ``parts`` use ``/``. Under a URI they are percent-encoded into its
        path (RFC 3986 sub-delimiters kept), before any ``?options``, so the URI resolves to the
        same object again."""
        return Location(self.fs, posixpath.join(self.path, *parts), join_uri(self.uri, *parts))

    def info(self) -> pafs.FileInfo:
        """pyarrow's file info (type NotFound when missing)."""
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        """True for an existing file or folder."""
        return self.info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        """True for an existing folder (an object store prefix with objects under it)."""
        return self.info().type == pafs.FileType.Directory

    def children(self) -> list[str]:
        """Names directly inside this folder (empty when it does not exist)."""
        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False, allow_not_found=True))
        return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)

    def read_text(self) -> str:
        """The whole file as UTF-8 text."""
        with self.fs.open_input_stream(self.path) as f:
            return f.read().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        """Write the file so that readers see the old or the new content, never half.

        Locally through a temporary file and a rename; an object store's single PUT is
        already all or nothing.
        """
        if self.is_local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.tmp{os.getpid()}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, self.path)
            except BaseException:
                # (a kill -9 still leaves it: the scoring claim and the run claim clear those)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            return
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def write_text(self, text: str) -> None:
        """:meth:`write_bytes` for UTF-8 text."""
        self.write_bytes(text.encode("utf-8"))

    def upload(self, local_file: str) -> None:
        """Copy a local file here (atomically, as :meth:`write_bytes`)."""
        with open(local_file, "rb") as f:
            self.write_bytes(f.read())

    def makedirs(self) -> None:
        """Create the folder and its parents (a no-op on object stores, which have none)."""
        self.fs.create_dir(self.path, recursive=True)

    def remove(self, first: Sequence[str] = ()) -> None:
        """Delete this file or folder tree; a symbolic link is unlinked, never followed.

        ``first``: files of the folder to delete before the rest. An object store deletes a
        folder object by object, in batches: a web page's ``index.html`` deleted first means a
        kill half way leaves no page rather than a page whose images are gone.
        """
        if self.is_local and os.path.islink(self.path):
            os.unlink(self.path)
            return
        kind = self.info().type
        if kind == pafs.FileType.Directory:
            for name in first:
                self.join(name).remove()
            self.fs.delete_dir(self.path)
        elif kind == pafs.FileType.File:
            self.fs.delete_file(self.path)


def file_sha256(loc: Location) -> str:
    """sha256 of the file at ``loc`` (local or remote), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with loc.fs.open_input_stream(loc.path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve(path_or_uri: str) -> Location:
    """A :class:`Location` for a local path (made absolute, ``~`` expanded) or a URI.

    ``file://`` URIs become local paths, so the same folder compares equal however it
    was written.
    """
    if not is_uri(path_or_uri):
        local = os.path.abspath(os.path.expanduser(path_or_uri))
        return Location(pafs.LocalFileSystem(), local, local)
    if "#" in path_or_uri:
        # pyarrow reads '#' as the start of a fragment and drops the rest: the data would go to
        # (or come from) another folder without a word
        # (not echoed: a '#' in a password would keep redact_uri from finding the user info)
        raise ValueError(f"a {path_or_uri.split(':', 1)[0]}:// URI cannot contain '#' (it starts a fragment); "
                         f"write it as %23 or rename the folder")
    fs, path = pafs.FileSystem.from_uri(path_or_uri)
    if isinstance(fs, pafs.LocalFileSystem):
        local = os.path.abspath(path)
        return Location(fs, local, local)
    return Location(fs, path.rstrip("/"), path_or_uri.rstrip("/"))


class NestedLocationError(ValueError):
    """An output folder would overlap a folder the job reads."""


def _identity(loc: Location) -> tuple[str, str]:
    """(filesystem kind, canonical path) for comparing two locations."""
    if loc.is_local:
        return "local", os.path.realpath(loc.path)
    return loc.fs.type_name, loc.path.rstrip("/")


def nesting(a: Location, b: Location) -> str | None:
    """How ``a`` relates to ``b``: "the same folder as", "inside", "a parent of", or None.

    Symbolic links are resolved for local paths, so a link into the input is caught.
    """
    (kind_a, pa_), (kind_b, pb) = _identity(a), _identity(b)
    if kind_a != kind_b:
        return None
    if pa_ == pb:
        return "the same folder as"
    if pa_.startswith(pb.rstrip("/") + "/"):
        return "inside"
    if pb.startswith(pa_.rstrip("/") + "/"):
        return "a parent of"
    return None


def check_apart(output: Location, source: Location, *, output_name: str, source_name: str) -> None:
    """Refuse an output that is ``source``, contains it or lies inside it.

    An output inside the data would be read as data next time; one that contains the data
    could be replaced with the data in it.

    Raises:
        NestedLocationError: naming both folders and how they overlap.
    """
    relation = nesting(output, source)
    if relation is not None:
        raise NestedLocationError(
            f"{output_name} {redact_uri(output.uri)} is {relation} {source_name} {redact_uri(source.uri)}; "
            f"choose a folder outside it")


#: Larger files are refused before reading: no face image is this big, and reading one
#: whole would take a decode worker's memory.
MAX_FILE_BYTES = 256 * 2**20


class FileReadError(OSError):
    """A listed file could not be read at its turn; ``reason`` says why, for an error row."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot read {path!r}: {reason}")


def _open_regular(path: str | bytes) -> tuple[int, os.stat_result]:
    """A read-only descriptor of a local regular file and its stat, or FileReadError."""
    # O_NONBLOCK: opening a FIFO (or a device) named like an image must not block the job;
    # fstat on the open descriptor then tells what it really is, with no race.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileReadError(os.fsdecode(path), "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def open_listed_file(path: str, fs: pafs.FileSystem | None = None) -> BinaryIO | pa.NativeFile:
    """A binary stream over one listed file, for readers that need only its start (headers).

    Local files open as :func:`read_file_bytes` opens them: a FIFO or device named like an
    image raises :class:`FileReadError` instead of blocking forever.
    """
    if fs is None or isinstance(fs, pafs.LocalFileSystem):
        fd, _ = _open_regular(path)
        return os.fdopen(fd, "rb")
    return fs.open_input_file(path)


def _read_capped(read: Callable[[int], bytes], name: str, step: int, max_bytes: int) -> bytes:
    """Read to the end of the file as it is now, ``step`` bytes at a time and at most one byte
    over ``max_bytes``: a file that grew since its size was read is read whole, or refused
    when it grew too large."""
    chunks, total = [], 0
    while total <= max_bytes:
        chunk = read(min(step, max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if total > max_bytes:
        raise FileReadError(name, f"file grew beyond the limit of {max_bytes} bytes")
    return b"".join(chunks)


def _read_local(path: str | bytes, max_bytes: int) -> bytes:
    fd, st = _open_regular(path)
    try:
        if st.st_size > max_bytes:
            raise FileReadError(os.fsdecode(path), f"{st.st_size} bytes exceeds the limit of {max_bytes}")
        return _read_capped(lambda n: os.read(fd, n), os.fsdecode(path), 1 << 22, max_bytes)
    finally:
        os.close(fd)


def read_file_bytes(path: str | bytes, fs: pafs.FileSystem | None = None, *,
                    max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The whole content of one listed file, or :class:`FileReadError` saying why not.

    Covers files removed after listing, unreadable ones (permissions, broken or looping
    links), things that are not regular files (FIFOs, devices, folders) and oversized files.
    """
    name = os.fsdecode(path)
    try:
        if fs is None or isinstance(fs, pafs.LocalFileSystem):
            return _read_local(path, max_bytes)
        info = fs.get_file_info(name)
        if info.type == pafs.FileType.NotFound:
            raise FileReadError(name, "file vanished after listing")
        if info.type != pafs.FileType.File:
            raise FileReadError(name, "not a regular file")
        if info.size is not None and info.size > max_bytes:
            raise FileReadError(name, f"{info.size} bytes exceeds the limit of {max_bytes}")
        # Bounded (an object replaced since, or of no reported size), in steps of the listed size
        # or 16 MiB: pyarrow reserves the whole amount asked for before it reads.
        step = (info.size + 1) if info.size is not None else 16 << 20
        with fs.open_input_stream(name) as f:
            return _read_capped(f.read, name, step, max_bytes)
    except FileReadError:
        raise
    except FileNotFoundError as exc:
        raise FileReadError(name, "file vanished after listing (or is a broken link)") from exc
    except PermissionError as exc:
        raise FileReadError(name, "permission denied") from exc
    except OSError as exc:
        raise FileReadError(name, f"{type(exc).__name__}: {exc.strerror or exc}") from exc
