"""Download MNIST into a folder and check every byte of it.

    python mnist_downloader.py [--root data/mnist] [--mirror URL_OR_DIR ...]

Each of the four .gz files is fetched from the first mirror that delivers a
good copy, decompressed on the fly, checked against the official SHA-256, flushed
to disk and only then renamed to its final name. A file found in root is checked
against its SHA-256 once; its size and modification time are then remembered in
root/.verified, so later starts cost a stat, and a file that changed since (a
damaged or foreign file with the same name, Fashion-MNIST say) is checked again
and fetched again if it fails.

Several processes may fill one folder at once (the nodes of a torchrun job on a
shared file system): each writes under temporary names of its own, NAME.tmp-HOST-PID-RANDOM,
and a start-up clean-up removes only the temporary files of writers that are gone.

A mirror is an http(s) URL or a local folder (plain path or file:// URL) that
holds the .gz files. Mirrors from --mirror come first, then those in the
environment variable MNIST_MIRROR (separated by spaces or commas), then the
public defaults below.
"""

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import secrets
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib

from tqdm import tqdm

DEFAULT_MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]

# Decompressed file name -> (sha256, size in bytes) of the official files.
FILES = {
    "train-images-idx3-ubyte": (
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db", 47040016),
    "train-labels-idx1-ubyte": (
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5", 60008),
    "t10k-images-idx3-ubyte": (
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7", 7840016),
    "t10k-labels-idx1-ubyte": (
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2", 10008),
}

TIMEOUT_S = 30  # per network operation, so a dead mirror cannot hang us
FILE_DEADLINE_S = 900  # per file, so a mirror that trickles a byte at a time cannot either
CHUNK = 1 << 16
STAMPS = ".verified"  # name -> [size, mtime_ns, sha256] of the files verified in root
# A temporary file untouched for longer than any download may take is a dead writer's, whoever wrote it.
STALE_S = FILE_DEADLINE_S + TIMEOUT_S
HOST = socket.gethostname()


class DownloadError(RuntimeError):
    """No mirror delivered a good copy of a file."""


class _BadFile(Exception):
    """A mirror answered, but with something that is not the file we want."""


def mirrors_from(cli_mirrors=None):
    """Mirrors to try, in order: CLI ones, then $MNIST_MIRROR, then defaults."""
    env = os.environ.get("MNIST_MIRROR", "").replace(",", " ").split()
    return list(cli_mirrors or []) + env + DEFAULT_MIRRORS


def _open(mirror, filename):
    """Open filename on a mirror; return (binary stream, size or None)."""
    if mirror.startswith(("http://", "https://")):
        url = mirror.rstrip("/") + "/" + filename
        response = urllib.request.urlopen(url, timeout=TIMEOUT_S)
        return response, response.length  # length is None without Content-Length
    folder = mirror
    if mirror.startswith("file:"):
        folder = urllib.request.url2pathname(urllib.parse.urlparse(mirror).path)
    f = open(os.path.join(folder, filename), "rb")
    return f, os.fstat(f.fileno()).st_size


def _gunzip_capped(src, out, size, progress_bar):
    """Stream-decompress src into out; refuse more than size bytes of output.

    Returns the sha256 hex digest of what was written.
    """
    # A gzip is never much larger than its content, so an endless or huge
    # download is refused too, not just a huge output.
    max_compressed = size + size // 100 + 65536
    unzip = zlib.decompressobj(16 + zlib.MAX_WBITS)  # 16+: expect a gzip header
    sha, read, written = hashlib.sha256(), 0, 0
    deadline = time.monotonic() + FILE_DEADLINE_S
    while not unzip.eof:
        if time.monotonic() > deadline:
            raise _BadFile(f"no complete file within {FILE_DEADLINE_S} s")
        chunk = getattr(src, "read1", src.read)(CHUNK)  # what has arrived, so the deadline is checked
        if not chunk:
            raise _BadFile("truncated gzip file")
        read += len(chunk)
        progress_bar.update(len(chunk))
        if read > max_compressed:
            raise _BadFile(f"download larger than {max_compressed} bytes")
        # Ask for at most one byte more than allowed: getting it proves the
        # file is too big without ever inflating a decompression bomb.
        data = unzip.decompress(chunk, size + 1 - written)
        written += len(data)
        if written > size:
            raise _BadFile(f"decompresses to more than {size} bytes")
        sha.update(data)
        out.write(data)
    if written != size:
        raise _BadFile(f"decompresses to {written} bytes, expected {size}")
    return sha.hexdigest()


def _fetch(mirror, name, sha256, size, dest, progress):
    """Put a verified copy of name from one mirror at dest, or raise."""
    # Same folder, so os.replace is an atomic rename. Not tempfile.mkstemp:
    # its files are private (0600), this one gets the usual permissions.
    tmp = _temporary(dest)
    out = open(tmp, "xb")
    try:
        with out:
            src, total = _open(mirror, name + ".gz")
            with src, tqdm(total=total, desc=name, unit="B", unit_scale=True,
                           file=sys.stderr, disable=not progress) as bar:
                digest = _gunzip_capped(src, out, size, bar)
            out.flush()
            os.fsync(out.fileno())
        if digest != sha256:
            raise _BadFile("sha256 mismatch")
        os.replace(tmp, dest)
        fsync_dir(os.path.dirname(os.path.abspath(dest)))
    finally:
        # After a failure (or Ctrl-C) only the temp file exists; remove it.
        if os.path.exists(tmp):
            os.remove(tmp)


def fsync_dir(folder):
    """Flush a folder's entries (a rename in it) to disk. Not on Windows: a folder cannot be opened
    there (os.open raises PermissionError), and NTFS journals the rename itself."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(err):
    """One short phrase for what a mirror answered."""
    if isinstance(err, urllib.error.HTTPError):
        return str(err)  # e.g. "HTTP Error 404: Not Found"
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)  # e.g. "[Errno 111] Connection refused"
    if isinstance(err, FileNotFoundError):
        return "file not found"
    if isinstance(err, zlib.error):
        return f"not a valid gzip file ({err})"
    return str(err) or type(err).__name__


def _is_verified(path, sha256, size):
    """True if path exists with the expected size and sha256."""
    if not os.path.isfile(path) or os.path.getsize(path) != size:
        return False
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest() == sha256


def _fetch_from_any(mirrors, name, sha256, size, dest, progress):
    """Try mirrors in order; return the one that worked or raise DownloadError."""
    answers = []
    for mirror in mirrors:
        try:
            _fetch(mirror, name, sha256, size, dest, progress)
            return mirror
        # OSError covers HTTP errors, refused connections, timeouts and
        # missing local files; HTTPException covers a cut-off response.
        except (OSError, http.client.HTTPException, zlib.error, _BadFile) as err:
            answers.append(f"  {mirror}: {_describe(err)}")
    raise DownloadError(
        f"could not get a good copy of {name}.gz from any mirror:\n"
        + "\n".join(answers)
        + "\nPass a mirror that has the MNIST .gz files (an http(s) URL or a "
        "local folder) with --mirror URL_OR_DIR or the MNIST_MIRROR "
        "environment variable.")


def _temporary(dest):
    """A temporary name beside dest, unique and naming its writer: dest.tmp-HOST-PID-RANDOM."""
    return f"{dest}.tmp-{HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def _running(pid):
    """True if process pid runs on this host, or if that cannot be asked: on Windows os.kill would end it."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def _stale(path, now):
    """True for a temporary file whose writer is gone: untouched for STALE_S, or written by a process
    of this host that no longer runs. Another host's recent file may be a download in progress."""
    try:
        if now - os.path.getmtime(path) > STALE_S:
            return True
    except FileNotFoundError:  # its writer has just renamed or removed it
        return False
    host, pid = _writer(os.path.basename(path))
    return host == HOST and not _running(pid)


def _writer(name):
    """(host, pid) from a temporary file's name NAME.tmp-HOST-PID-RANDOM; (None, None) from another name."""
    fields = name.rpartition(".tmp-")[2].rsplit("-", 2)  # a host name may hold "-" itself
    return (fields[0], int(fields[1])) if len(fields) == 3 and fields[1].isdigit() else (None, None)


def _remove_stale_temporaries(root):
    """Remove the temporary files of killed downloads in root, never those of downloads in progress."""
    now = time.time()
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if ".tmp-" in name and _stale(path, now):
            with contextlib.suppress(FileNotFoundError):  # another process removed it first
                os.remove(path)


def atomic_write(path, write):
    """write(file) into a temporary file of this process's own beside path, fsync it, rename it to
    path, fsync the folder: readers see the old file or the whole new one, and writers that race
    each replace the whole file, never write into one another's."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = _temporary(path)
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_stamps(root, stamps):
    atomic_write(os.path.join(root, STAMPS), lambda f: f.write(json.dumps(stamps).encode()))


def _stamp(path):
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _read_stamps(root):
    try:
        with open(os.path.join(root, STAMPS)) as f:
            stamps = json.load(f)
        return stamps if isinstance(stamps, dict) else {}
    except (OSError, ValueError):
        return {}


def _remembered(root, stamps, name, sha256):
    """True if name was verified and has not changed since (same size and modification time)."""
    path = os.path.join(root, name)
    return os.path.isfile(path) and stamps.get(name) == _stamp(path) + [sha256]


def ensure_mnist_present(root="data/mnist", mirrors=None, files=FILES, verify=True):
    """What every script calls at start-up: a stat per file when all were verified before, else
    ensure_mnist (which checks each file's SHA-256 and fetches what is missing or wrong).
    verify=False (data.verify: false) trusts files that are present: data in MNIST's format that
    is not MNIST itself (a subset, Fashion-MNIST, the tests' synthetic digits)."""
    if not verify:
        if all(os.path.exists(os.path.join(root, name)) for name in files):
            return
        ensure_mnist(root, mirrors, files)
        return
    stamps = _read_stamps(root)
    if not all(_remembered(root, stamps, name, sha) for name, (sha, _) in files.items()):
        ensure_mnist(root, mirrors, files)


def ensure_mnist(root="data/mnist", mirrors=None, files=FILES, progress=True):
    """Make sure every file of the table is in root and verified.

    Missing files, and present files with the wrong content, are fetched; temporary files that
    a killed download left behind are removed (_remove_stale_temporaries). Raises DownloadError
    when no mirror delivers a good copy of a file.
    """
    mirrors = mirrors_from(None) if mirrors is None else list(mirrors)
    os.makedirs(root, exist_ok=True)
    _remove_stale_temporaries(root)
    stamps = {}
    for name, (sha256, size) in files.items():
        dest = os.path.join(root, name)
        if _is_verified(dest, sha256, size):
            print(f"{name}: ok (already verified)")
        else:
            if os.path.exists(dest):
                print(f"{name}: present but fails its sha256 check, fetching again")
            mirror = _fetch_from_any(mirrors, name, sha256, size, dest, progress)
            print(f"{name}: downloaded from {mirror}")
        stamps[name] = _stamp(dest) + [sha256]
    _write_stamps(root, stamps)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Download the four MNIST files, decompress them into ROOT "
        "and verify their SHA-256. Files already there and verified are kept.",
        epilog="Mirrors are tried in order: --mirror ones, then MNIST_MIRROR "
        "(separated by spaces or commas), then "
        + ", ".join(DEFAULT_MIRRORS) + ".")
    parser.add_argument("--root", default="data/mnist",
                        help="folder that receives the decompressed files "
                        "(default: %(default)s)")
    parser.add_argument("--mirror", action="append", metavar="URL_OR_DIR",
                        help="http(s) URL or local folder holding the .gz "
                        "files; repeat to try several")
    args = parser.parse_args(argv)
    try:
        ensure_mnist(args.root, mirrors_from(args.mirror), FILES)
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
