"""Download MNIST into a folder and check every byte of it.

    python mnist_downloader.py [--root data/mnist] [--mirror URL_OR_DIR ...]

Each of the four .gz files is fetched from the first mirror that delivers a
good copy, decompressed on the fly, checked against the official SHA-256, and
only then renamed to its final name. So a file under its final name in root
is always a verified one, and a later run can trust it and skip it.

A mirror is an http(s) URL or a local folder (plain path or file:// URL) that
holds the .gz files. Mirrors from --mirror come first, then those in the
environment variable MNIST_MIRROR (separated by spaces or commas), then the
public defaults below.
"""

import argparse
import hashlib
import http.client
import os
import secrets
import sys
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
CHUNK = 1 << 16


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
    while not unzip.eof:
        chunk = src.read(CHUNK)
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
    tmp = f"{dest}.tmp-{secrets.token_hex(4)}"
    out = open(tmp, "xb")
    try:
        with out:
            src, total = _open(mirror, name + ".gz")
            with src, tqdm(total=total, desc=name, unit="B", unit_scale=True,
                           file=sys.stderr, disable=not progress) as bar:
                digest = _gunzip_capped(src, out, size, bar)
        if digest != sha256:
            raise _BadFile("sha256 mismatch")
        os.replace(tmp, dest)
    finally:
        # After a failure (or Ctrl-C) only the temp file exists; remove it.
        if os.path.exists(tmp):
            os.remove(tmp)


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


def ensure_mnist_present(root="data/mnist", mirrors=None):
    """ensure_mnist only if a file is missing: the scripts call this at start-up, and files that are
    present were verified when they were downloaded (MNIST() still checks their structure)."""
    if not all(os.path.exists(os.path.join(root, f)) for f in FILES):
        ensure_mnist(root, mirrors)


def ensure_mnist(root="data/mnist", mirrors=None, files=FILES, progress=True):
    """Make sure every file of the table is in root and verified.

    Missing files, and present files with the wrong content, are fetched.
    Raises DownloadError when no mirror delivers a good copy of a file.
    """
    mirrors = mirrors_from(None) if mirrors is None else list(mirrors)
    os.makedirs(root, exist_ok=True)
    for name, (sha256, size) in files.items():
        dest = os.path.join(root, name)
        if _is_verified(dest, sha256, size):
            print(f"{name}: ok (already verified)")
            continue
        if os.path.exists(dest):
            print(f"{name}: present but fails its sha256 check, fetching again")
        mirror = _fetch_from_any(mirrors, name, sha256, size, dest, progress)
        print(f"{name}: downloaded from {mirror}")


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
