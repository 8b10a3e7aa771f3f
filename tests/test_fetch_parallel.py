"""Fetching objects: several requests in flight, each object streamed once, an interrupted
object resumed with a Range and verified whole, and no worker left behind after a failure."""

import hashlib
import os
import signal
import subprocess
import sys
import threading

import pytest

from conftest import ISCONF, Author, Host, error_line
from hostile import HostileMirror

BIG = 3 * 1024 * 1024 + 12345   # several CHUNKs, odd-sized: the cut falls mid-chunk
GATE_WAIT = 2                   # seconds an object request waits for a second one to arrive


def sha(data):
    return hashlib.sha256(data).hexdigest()


class GatedMirror(HostileMirror):
    """A HostileMirror that holds each object request until a second one is in flight (or
    GATE_WAIT passed once), and counts the most object requests it saw at the same time.
    A client that fetches one object after another never gets past one."""

    def __init__(self, directory):
        super(GatedMirror, self).__init__(directory)
        self.lock = threading.Lock()
        self.in_flight = self.most = 0
        self.overlap = threading.Event()
        self.gate = False  # hold object requests until two overlap
        self.hold = None   # an Event: object requests wait for it (the interruption test)

    def _serve(self, conn, target, headers):
        if not target.startswith("/objects/"):
            return super(GatedMirror, self)._serve(conn, target, headers)
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            if self.in_flight >= 2:
                self.overlap.set()
        try:
            if self.hold is not None:
                self.hold.wait(20)
            elif self.gate and not self.overlap.wait(GATE_WAIT):
                self.overlap.set()   # one at a time, then: wait once, not once per object
            return super(GatedMirror, self)._serve(conn, target, headers)
        finally:
            with self.lock:
                self.in_flight -= 1

    def object_requests(self, content):
        return [rng for path, rng in self.requests if path == "/objects/" + sha(content)]


def contents(n):
    return [("file %d\n" % i).encode() * (i + 1) for i in range(n)]


@pytest.fixture
def repo(tmp_path, keys):
    return Author(str(tmp_path / "repo"), keys=keys)


def publish(tmp_path, author, files):
    """One snap of these files (name -> bytes) under /etc."""
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (src / "etc" / name).write_bytes(data)
    author.commit(["--root", str(src), "snap"] + ["/etc/" + name for name in sorted(files)])


@pytest.fixture
def gated(repo):
    server = GatedMirror(repo.repo)
    yield server
    server.stop()


@pytest.fixture
def fresh(tmp_path, keys, gated):
    host = Host(str(tmp_path / "host"))
    host.init(gated.url, keys, "--retries", "1")   # a failed run fails at once
    return host


def test_objects_are_fetched_with_requests_overlapping(tmp_path, repo, gated, fresh):
    files = {"f%02d" % i: data for i, data in enumerate(contents(12))}
    publish(tmp_path, repo, files)
    gated.gate = True
    fresh("up", expect="ok")
    for name, data in files.items():
        with open(fresh.path("/etc/" + name), "rb") as f:
            assert f.read() == data
    assert gated.most >= 2
    # Each object once, whole.
    objects = sorted(p for p, _ in gated.requests if p.startswith("/objects/"))
    assert objects == sorted("/objects/" + sha(d) for d in files.values())


def big_object(tmp_path, repo):
    data = os.urandom(BIG)
    publish(tmp_path, repo, {"big": data})
    return data


def interrupted(fresh, gated, data):
    """A first run whose object answer stops half-way: unreachable, the half kept as .part."""
    gated.behave["/objects/" + sha(data)] = "truncate"
    assert "objects/" in error_line(fresh("up", expect="unreachable"))
    del gated.behave["/objects/" + sha(data)]
    part = fresh.state("objects", sha(data) + ".part")
    assert os.path.getsize(part) == BIG // 2
    return part


def applied(fresh, data):
    with open(fresh.path("/etc/big"), "rb") as f:
        return f.read() == data


def test_an_interrupted_object_resumes_from_what_was_staged(tmp_path, repo, gated, fresh):
    data = big_object(tmp_path, repo)
    part = interrupted(fresh, gated, data)
    fresh("up", expect="ok")
    assert applied(fresh, data) and not os.path.exists(part)
    assert gated.object_requests(data) == [None, "bytes=%d-" % (BIG // 2)]


def test_a_damaged_prefix_is_caught_by_the_whole_hash_and_fetched_again(tmp_path, repo, gated, fresh):
    # The kept half is damaged here (as a power loss can leave it): the whole does not match,
    # so the object is fetched once more from its first byte, and then it does.
    data = big_object(tmp_path, repo)
    part = interrupted(fresh, gated, data)
    with open(part, "r+b") as f:
        f.seek(1000)
        f.write(b"\0" * 10)
    fresh("up", expect="ok")
    assert applied(fresh, data)
    assert gated.object_requests(data) == [None, "bytes=%d-" % (BIG // 2), None]


def test_a_server_ignoring_range_sends_it_all_and_the_object_still_verifies(tmp_path, repo, gated, fresh):
    data = big_object(tmp_path, repo)
    interrupted(fresh, gated, data)
    gated.behave["/objects/" + sha(data)] = "ignore-range"
    fresh("up", expect="ok")
    assert applied(fresh, data)
    assert gated.object_requests(data) == [None, "bytes=%d-" % (BIG // 2)]


@pytest.mark.parametrize("damage", ["last byte", "short"])
def test_a_part_that_does_not_verify_from_the_first_byte_is_refused_and_removed(tmp_path, repo, gated, fresh,
                                                                                damage):
    # The mirror's copy is damaged: the resumed whole does not match, nor the copy fetched from zero.
    # A copy shorter than the kept start answers the Range with 416: then too from zero, and refused.
    data = big_object(tmp_path, repo)
    part = interrupted(fresh, gated, data)
    gated.replace["/objects/" + sha(data)] = data[:-1] + b"!" if damage == "last byte" else data[:1000]
    assert "does not match the signed journal" in error_line(fresh("up", expect="refused"))
    assert not os.path.exists(part)
    assert gated.object_requests(data) == [None, "bytes=%d-" % (BIG // 2), None]


def test_a_whole_part_left_by_an_interrupted_run_is_not_fetched_again(tmp_path, repo, gated, fresh):
    data = big_object(tmp_path, repo)
    part = interrupted(fresh, gated, data)
    with open(part, "wb") as f:
        f.write(data)
    fresh("up", expect="ok")
    assert applied(fresh, data)
    assert gated.object_requests(data) == [None]


def test_sigterm_while_objects_are_in_flight_stops_the_run(tmp_path, repo, gated, keys):
    files = {"f%02d" % i: data for i, data in enumerate(contents(6))}
    publish(tmp_path, repo, files)
    host = Host(str(tmp_path / "patient"))
    host.init(gated.url, keys)
    gated.hold = threading.Event()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
    proc = subprocess.Popen([sys.executable, "-I", ISCONF, "--root", host.root, "up"], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert gated.overlap.wait(20)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)   # well before the held requests would be let go (20 s)
    finally:
        gated.hold.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM
    assert not any(os.path.exists(host.path("/etc/" + name)) for name in files)
    host("up", expect="ok")


def test_the_first_error_wins_and_no_worker_is_left_behind(isconf, tmp_path, repo, gated, fresh):
    # In process, to see the threads: one object is refused at once while the others trickle
    # (for up to 20 s each); the refusal is the error, and every worker has ended when it is raised.
    files = {"f%02d" % i: data for i, data in enumerate(contents(6))}
    publish(tmp_path, repo, files)
    bad = sorted(files.values(), key=len)[-1]
    gated.replace["/objects/" + sha(bad)] = bad[:-1] + b"!"
    for data in files.values():
        if data is not bad:
            gated.behave["/objects/" + sha(data)] = "trickle"
    before = set(threading.enumerate())
    host = isconf.Host(fresh.root)
    isconf.ensure_state(host)
    try:
        with pytest.raises(isconf.Refused, match="does not match the signed journal"):
            isconf.Sync(isconf.Run(host)).sync()
    finally:
        host.state.close()
    # The mirror's own connection threads may still be trickling to a closed socket; the agent's are gone.
    assert [t for t in threading.enumerate() if t not in before and not t.name.startswith("hostile")] == []
    assert not [n for n in os.listdir(fresh.state("objects")) if n.endswith(".part")]


@pytest.mark.parametrize("form", ["file://", "directory"])
def test_objects_from_a_file_mirror_are_fetched_and_resumed(tmp_path, repo, keys, form):
    # Several workers read the share at once; a half kept from before is hashed again and the rest read after it.
    files = {"f%02d" % i: data for i, data in enumerate(contents(10))}
    files["big"] = os.urandom(BIG)
    publish(tmp_path, repo, files)
    host = Host(str(tmp_path / "host"))
    host.init(("file://" if form == "file://" else "") + repo.repo, keys)
    with open(host.state("objects", sha(files["big"]) + ".part"), "wb") as f:
        f.write(files["big"][:BIG // 2])
    host("up", expect="ok")
    for name, data in files.items():
        with open(host.path("/etc/" + name), "rb") as f:
            assert f.read() == data
    assert not [n for n in os.listdir(host.state("objects")) if n.endswith(".part")]
