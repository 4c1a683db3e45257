"""Tests for mnist_downloader on tiny synthetic files.

Mirrors are a local HTTP server on 127.0.0.1 and folders under tmp_path; the
real internet mirrors are never reached (tests pass explicit mirrors, or
empty DEFAULT_MIRRORS where the default list would be used).
"""

import gzip
import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import time

import pytest

# Let a plain `pytest` (not only `python -m pytest`) import the script.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mnist_downloader as md  # noqa: E402

RAW = {"images-idx3": os.urandom(300), "labels-idx1": os.urandom(200)}
TABLE = {name: (hashlib.sha256(data).hexdigest(), len(data)) for name, data in RAW.items()}
GOOD = {name + ".gz": gzip.compress(data) for name, data in RAW.items()}


def corrupt(how):
    """The GOOD files, each spoiled the given way."""
    def spoil(gz, size):
        if how == "bad hash":  # right size, wrong bytes
            return gzip.compress(os.urandom(size))
        if how == "not gzip":
            return gzip.decompress(gz)
        if how == "truncated":
            return gz[: len(gz) // 2]
        if how == "bomb":  # 1 MB of zeros in ~1 kB
            return gzip.compress(bytes(1 << 20))
        if how == "huge download":  # tiny content behind a 200 kB header
            buf = io.BytesIO()
            with gzip.GzipFile(filename="x" * 200_000, mode="wb", fileobj=buf) as f:
                f.write(gzip.decompress(gz))
            return buf.getvalue()
        raise AssertionError(how)
    return {fn: spoil(gz, len(gzip.decompress(gz))) for fn, gz in GOOD.items()}


@pytest.fixture
def serve():
    """serve(files) -> (base URL, list of requested paths); 404 for others."""
    servers = []

    def start(files):
        requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                requests.append(self.path)
                body = files.get(self.path.rsplit("/", 1)[-1])
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep test output clean
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}/mnist/", requests

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def no_defaults(monkeypatch):
    """Make sure nothing falls through to the real internet mirrors."""
    monkeypatch.setattr(md, "DEFAULT_MIRRORS", [])
    monkeypatch.delenv("MNIST_MIRROR", raising=False)


def folder_mirror(path, files):
    path.mkdir()
    for fn, data in files.items():
        (path / fn).write_bytes(data)
    return str(path)


def assert_good(root):
    """root holds exactly the verified files and the record of their verification, no temp files."""
    assert sorted(os.listdir(root)) == sorted(list(RAW) + [md.STAMPS])
    for name, data in RAW.items():
        assert (root / name).read_bytes() == data


@pytest.mark.parametrize("slash", ["/", ""])
def test_good_mirror_then_skip(serve, tmp_path, capsys, slash):
    url, requests = serve(GOOD)
    root = tmp_path / "mnist"
    md.ensure_mnist(root, [url.rstrip("/") + slash], TABLE, progress=False)
    assert_good(root)
    assert len(requests) == len(RAW)
    assert "downloaded from" in capsys.readouterr().out

    md.ensure_mnist(root, [url], TABLE, progress=False)
    assert len(requests) == len(RAW)  # nothing fetched the second time
    assert capsys.readouterr().out.count("ok (already verified)") == len(RAW)


@pytest.mark.parametrize("how, answer", [
    ("bad hash", "sha256 mismatch"),
    ("not gzip", "not a valid gzip file"),
    ("truncated", "truncated gzip file"),
    ("bomb", "decompresses to more than"),
    ("huge download", "download larger than"),
])
def test_corrupt_first_mirror_falls_back(serve, tmp_path, capsys, how, answer):
    bad, _ = serve(corrupt(how))
    good, _ = serve(GOOD)
    root = tmp_path / "mnist"
    with pytest.raises(md.DownloadError, match=answer):
        md.ensure_mnist(root, [bad], TABLE, progress=False)
    assert os.listdir(root) == []

    md.ensure_mnist(root, [bad, good], TABLE, progress=False)
    assert_good(root)
    assert capsys.readouterr().out.count(f"downloaded from {good}") == len(RAW)


def test_all_mirrors_bad(serve, tmp_path):
    empty, _ = serve({})
    bad, _ = serve(corrupt("bad hash"))
    missing = str(tmp_path / "no-such-folder")
    root = tmp_path / "mnist"
    with pytest.raises(md.DownloadError) as err:
        md.ensure_mnist(root, [empty, missing, bad], TABLE, progress=False)
    message = str(err.value)
    assert f"{empty}: HTTP Error 404" in message
    assert f"{missing}: file not found" in message
    assert f"{bad}: sha256 mismatch" in message
    assert "--mirror" in message and "MNIST_MIRROR" in message
    assert os.listdir(root) == []  # no final files, no temp files


def test_refused_connection_is_reported(tmp_path):
    # Port 1 on localhost: nothing listens there, so the connection is refused.
    with pytest.raises(md.DownloadError, match="http://127.0.0.1:1/: .*refused"):
        md.ensure_mnist(tmp_path, ["http://127.0.0.1:1/"], TABLE, progress=False)


@pytest.mark.parametrize("as_url", [False, True])
def test_local_folder_mirror(tmp_path, as_url):
    folder = folder_mirror(tmp_path / "mirror", GOOD)
    mirror = "file://" + folder if as_url else folder
    md.ensure_mnist(tmp_path / "mnist", [mirror], TABLE, progress=False)
    assert_good(tmp_path / "mnist")


def test_present_wrong_file_is_refetched(serve, tmp_path):
    url, requests = serve(GOOD)
    root = tmp_path / "mnist"
    root.mkdir()
    name = next(iter(RAW))
    (root / name).write_bytes(bytes(len(RAW[name])))  # right size, wrong bytes
    md.ensure_mnist(root, [url], TABLE, progress=False)
    assert_good(root)
    assert len(requests) == len(RAW)


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    def interrupt(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(md.os, "replace", interrupt)
    folder = folder_mirror(tmp_path / "mirror", GOOD)
    root = tmp_path / "mnist"
    with pytest.raises(KeyboardInterrupt):
        md.ensure_mnist(root, [folder], TABLE, progress=False)
    assert os.listdir(root) == []


def test_mirror_order(monkeypatch):
    monkeypatch.setattr(md, "DEFAULT_MIRRORS", ["default"])
    monkeypatch.setenv("MNIST_MIRROR", " env1, env2\nenv3 ")
    assert md.mirrors_from(["cli1", "cli2"]) == ["cli1", "cli2", "env1", "env2", "env3", "default"]
    assert md.mirrors_from() == ["env1", "env2", "env3", "default"]
    monkeypatch.delenv("MNIST_MIRROR")
    assert md.mirrors_from() == ["default"]


def test_env_mirror_is_used_by_default(serve, tmp_path, monkeypatch, no_defaults):
    url, _ = serve(GOOD)
    monkeypatch.setenv("MNIST_MIRROR", url)
    md.ensure_mnist(tmp_path / "mnist", files=TABLE, progress=False)
    assert_good(tmp_path / "mnist")


def test_cli_success(serve, tmp_path, monkeypatch, capsys, no_defaults):
    monkeypatch.setattr(md, "FILES", TABLE)
    url, _ = serve(GOOD)
    md.main(["--root", str(tmp_path / "mnist"), "--mirror", url])
    assert_good(tmp_path / "mnist")
    assert capsys.readouterr().out.count("downloaded from") == len(RAW)


def test_cli_all_bad_exits_with_message(tmp_path, capsys, no_defaults):
    missing = str(tmp_path / "no-such-folder")
    with pytest.raises(SystemExit) as exit_:
        md.main(["--root", str(tmp_path / "mnist"), "--mirror", missing])
    assert exit_.value.code != 0
    err = capsys.readouterr().err
    assert f"{missing}: file not found" in err
    assert "--mirror URL_OR_DIR" in err
    assert "Traceback" not in err


def test_verified_files_are_remembered_and_a_changed_one_is_fetched_again(tmp_path, monkeypatch, capsys):
    folder = folder_mirror(tmp_path / "mirror", GOOD)
    root = tmp_path / "mnist"
    md.ensure_mnist_present(root, [folder], TABLE)
    assert_good(root)
    # all remembered: no file is hashed again
    monkeypatch.setattr(md, "_is_verified", lambda *a: pytest.fail("a remembered file was hashed again"))
    md.ensure_mnist_present(root, [folder], TABLE)
    monkeypatch.undo()
    # a file of the same size but other content (a foreign or damaged file under the same name)
    name = next(iter(RAW))
    (root / name).write_bytes(bytes(len(RAW[name])))
    capsys.readouterr()
    md.ensure_mnist_present(root, [folder], TABLE)
    assert_good(root)
    assert f"{name}: present but fails its sha256 check, fetching again" in capsys.readouterr().out


def dead_pid():
    """The pid of a process of this host that has ended."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def temporaries(root, age_s=0):
    """Temporary files in root as each kind of writer leaves them: {file name: should the clean-up remove it}."""
    name = next(iter(RAW))
    files = {f"{name}.tmp-{md.HOST}-{dead_pid()}-0a1b2c3d": True,  # a killed process of this host
             f"{md.STAMPS}.tmp-{md.HOST}-{dead_pid()}-0a1b2c3d": True,  # its stamps, a dot file
             f"{name}.tmp-{md.HOST}-{os.getpid()}-0a1b2c3d": age_s > md.STALE_S,  # a live one: stale only when old
             f"{name}.tmp-other-node-{os.getpid()}-0a1b2c3d": age_s > md.STALE_S,  # another host's: by age alone
             f"{name}.tmp-dead1234": age_s > md.STALE_S}  # a name that says nothing of its writer
    for f in files:
        (root / f).write_bytes(b"half a download")
        os.utime(root / f, (time.time() - age_s,) * 2)
    return files


@pytest.mark.parametrize("age_s", [0, md.STALE_S + 60])
def test_clean_up_removes_only_the_temporaries_of_writers_that_are_gone(tmp_path, age_s):
    folder = folder_mirror(tmp_path / "mirror", GOOD)
    root = tmp_path / "mnist"
    root.mkdir()
    files = temporaries(root, age_s)
    md.ensure_mnist(root, [folder], TABLE, progress=False)
    kept = sorted(f for f, stale in files.items() if not stale)
    assert sorted(os.listdir(root)) == sorted(list(RAW) + [md.STAMPS] + kept)


def test_a_download_in_progress_survives_another_process_that_starts(tmp_path):
    """One process is half way through a download when another fills the folder from a fast mirror:
    the first one's temporary file is left alone and its download completes."""
    half_sent, go_on, errors = threading.Event(), threading.Event(), []

    class Pausing(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = GOOD[self.path.rsplit("/", 1)[-1]]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            half_sent.set()
            go_on.wait(10)
            self.wfile.write(body[len(body) // 2:])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pausing)
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    root = tmp_path / "mnist"

    def slow():
        try:
            md.ensure_mnist(root, [f"http://127.0.0.1:{server.server_address[1]}/"], TABLE, progress=False)
        except Exception as e:  # noqa: BLE001 - reported by the assert below
            errors.append(e)

    first = threading.Thread(target=slow)
    first.start()
    try:
        assert half_sent.wait(10)
        md.ensure_mnist(root, [folder_mirror(tmp_path / "mirror", GOOD)], TABLE, progress=False)
    finally:
        go_on.set()
        first.join()
        server.shutdown()
        server.server_close()
    assert errors == []
    assert_good(root)


def test_processes_that_write_the_stamps_at_once_do_not_collide(tmp_path, monkeypatch):
    """Another process verifies the folder and writes its stamps, start to end, while this one is
    writing its own: both end well, and the stamps file is one of the two, whole."""
    folder = folder_mirror(tmp_path / "mirror", GOOD)
    root = tmp_path / "mnist"
    md.ensure_mnist(root, [folder], TABLE, progress=False)
    real_dumps, others = json.dumps, []

    def dumps_while_another_finishes(obj, **kwargs):  # called with this process's temporary file open
        if not others:
            others.append(1)
            md.ensure_mnist(root, [folder], TABLE, progress=False)
        return real_dumps(obj, **kwargs)

    monkeypatch.setattr(md.json, "dumps", dumps_while_another_finishes)
    md.ensure_mnist(root, [folder], TABLE, progress=False)
    monkeypatch.undo()
    assert others and md.ensure_mnist_present(root, [folder], TABLE) is None
    assert sorted(md._read_stamps(root)) == sorted(RAW)
    assert_good(root)


def test_on_windows_folders_are_not_opened_and_no_process_is_signalled(tmp_path, monkeypatch):
    """Windows cannot open a folder (os.open raises), and its os.kill would end the process it asks about:
    downloads there skip the folder flush and judge temporary files by age alone."""
    folder = folder_mirror(tmp_path / "mirror", GOOD)
    root = tmp_path / "mnist"
    root.mkdir()
    files = temporaries(root)
    real_open = os.open

    def windows_open(path, flags, *args):
        if os.path.isdir(path):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args)

    signalled = []
    with monkeypatch.context() as m:  # os.name is back before pytest reports a failure
        m.setattr(md.os, "name", "nt")
        m.setattr(md.os, "open", windows_open)
        m.setattr(md.os, "kill", lambda *args: signalled.append(args))
        md.ensure_mnist(root, [folder], TABLE, progress=False)
    assert signalled == []
    assert sorted(os.listdir(root)) == sorted(list(RAW) + [md.STAMPS] + list(files))  # none is old: all kept


def test_a_trickling_mirror_hits_the_per_file_deadline(tmp_path, monkeypatch):
    """A mirror that sends a byte now and then never trips the per-operation timeout; the
    per-file deadline stops it."""
    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for byte in GOOD["images-idx3.gz"][:30]:  # bounded: 30 bytes of a good file in ~3 s
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    threading.Event().wait(0.1)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    monkeypatch.setattr(md, "FILE_DEADLINE_S", 0.5)
    try:
        with pytest.raises(md.DownloadError, match="no complete file within 0.5 s"):
            md.ensure_mnist(tmp_path / "mnist", [f"http://127.0.0.1:{server.server_address[1]}/"], TABLE,
                            progress=False)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
