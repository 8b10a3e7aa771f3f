"""Forward compatibility: every entry is verified at once, but interpreted only when its turn comes."""

import json
import os

from conftest import append_unknown_entry, error_line

EXIT_NEWER = 10


def test_an_entry_of_an_unknown_kind_halts_the_host_there_with_its_own_code(author, server, keys, host,
                                                                           busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/before"])
    append_unknown_entry(author, keys, kind="package", name="nginx")
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/after"])
    host.init(server.url, keys)
    up = host("up")
    assert up.returncode == EXIT_NEWER
    assert "entry 2" in error_line(up) and "needs a newer isconf" in error_line(up)
    assert os.path.exists(host.path("/tmp/before")) and not os.path.exists(host.path("/tmp/after"))
    status = host("status", "--json")
    report = json.loads(status.out)
    assert status.returncode == EXIT_NEWER and report["needs_newer"]["seq"] == 2 and report["applied_seq"] == 1
    assert "needs a newer isconf" in host("status").out
    assert "package (an entry this isconf cannot interpret)" in host("log").out
    assert host("up").returncode == EXIT_NEWER  # and stays there: nothing skipped, nothing reordered


def test_a_known_kind_with_a_field_from_a_newer_isconf_halts_too(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/before"])
    append_unknown_entry(author, keys, kind="exec", argv=["/bin/touch", "/tmp/new"], cwd="/", timeout=30)
    host.init(server.url, keys)
    up = host("up")
    assert up.returncode == EXIT_NEWER and "unknown fields timeout" in error_line(up)
    assert not os.path.exists(host.path("/tmp/new"))


def test_a_damaged_envelope_is_still_refused_at_once(author, server, keys, host):
    # Only the kind's meaning waits for its turn: seq, prev and the chain are checked for every entry.
    author.commit(["reboot"])
    append_unknown_entry(author, keys, kind="Not A Kind!")
    host.init(server.url, keys, "--retries", "1")
    assert "is not a kind name" in error_line(host("up", expect="refused"))


def test_a_file_type_from_a_newer_isconf_halts_the_host_there(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/before"])
    append_unknown_entry(author, keys, kind="snap", files=[{"type": "fifo", "path": "/run/queue", "mode": 384}])
    host.init(server.url, keys)
    up = host("up")
    assert up.returncode == EXIT_NEWER and "file type 'fifo'" in error_line(up)
    assert os.path.exists(host.path("/tmp/before"))


def test_a_malformed_field_of_a_known_kind_is_refused_before_anything_applies(author, server, keys, host,
                                                                             busybox_root):
    # Not something a newer isconf writes: a path with '..' is refused at fetch time, as every check of the journal.
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/before"])
    append_unknown_entry(author, keys, kind="exec", argv=["/bin/true"], cwd="/tmp/../etc")
    host.init(server.url, keys, "--retries", "1")
    assert "normalised path" in error_line(host("up", expect="refused"))
    assert not os.path.exists(host.path("/tmp/before"))
