"""A hostile mirror: every way a server can lie or fail, and the host applies nothing.

Exit codes: network trouble that a later try or another mirror may cure (a body cut
short, a reset, a stall, 5xx, a redirect loop) is "unreachable" (3); an answer that
arrived but fails verification (wrong size, wrong bytes, a missing or wrong signature,
an old or foreign head) is "refused" (4): asking again would not make it true.
"""

import base64
import json
import os
import re
import socket
import threading
import time

import pytest

from conftest import error_line
from hostile import (HEAD, JOURNAL, RUN_TIMEOUT, SIG, SLOW, HostileMirror, Template, canon, entry, file_record, sha,
                     up_applies_nothing, utc)


# --- network failures: unreachable (3), nothing applied ----------------------------------
# A body cut short, a reset, a stall, an error status, a redirect loop: the
# mirror is down or broken, not lying; another mirror or a later run may well succeed.

O2 = "/objects/" + sha(Template.ISSUE)


def case(name, at, path, behaviour, fragment, *marks):
    return pytest.param(at, path, behaviour, fragment, id=name, marks=marks)


UNREACHABLE = [
    case("head truncated", 0, HEAD, "truncate", "branches/web/head from"),
    case("journal truncated", 0, JOURNAL, "truncate", "branches/web/journal from"),
    case("object truncated", 2, O2, "truncate", "objects/"),
    case("head reset mid-body", 0, HEAD, "reset", "branches/web/head from"),
    case("journal reset mid-body", 0, JOURNAL, "reset", "branches/web/journal from"),
    case("object reset mid-body", 2, O2, "reset", "objects/"),
    case("head trickled", 0, HEAD, "trickle", "too slow"),
    case("journal trickled", 0, JOURNAL, "trickle", "too slow"),
    case("object trickled", 2, O2, "trickle", "too slow"),
    case("head 500", 0, HEAD, ("status", 500), "500"),
    case("head 503", 0, HEAD, ("status", 503), "503"),
    case("journal 500", 2, JOURNAL, ("status", 500), "500"),
    case("object 503", 2, O2, ("status", 503), "503"),
    case("head redirect loop", 0, HEAD, ("redirect", None), "redirects"),
    case("head headers trickled", 0, HEAD, "trickle-headers", "too slow"),
    case("head redirect to a malformed URL", 0, HEAD, ("redirect", "http://[::1/x"), "branches/web/head from"),
    case("head redirect to another scheme", 0, HEAD, ("redirect", "ftp://127.0.0.1/head"), "only http"),
]


@pytest.mark.parametrize("at,path,behaviour,fragment", UNREACHABLE)
def test_network_failure_is_unreachable_and_applies_nothing(world, at, path, behaviour, fragment):
    if at:
        world.bring_to_seq_2()
    world.mirror.behave[path] = behaviour
    # A fetch gives up after --deadline 3 s plus 1 s per 16 KiB of its limit (64 KiB for a head):
    # a run still going a few seconds after that hangs.
    timeout = 9 if path == HEAD else 6
    up_applies_nothing(world, "unreachable", fragment, Template.MARKERS[at], timeout=timeout)
    assert path in world.mirror.paths()
    if path.startswith("/objects/") and behaviour == "truncate":   # the half that arrived is kept, to resume
        with open(world.host.state(path.lstrip("/") + ".part"), "rb") as f:
            assert f.read() == Template.ISSUE[:len(Template.ISSUE) // 2]


def test_missing_head_signature_is_refused(world):
    # Not a network failure: a host that trusts signers accepts only signed heads.
    world.mirror.replace[SIG] = None
    up_applies_nothing(world, "refused", "has no head.sig", Template.MARKERS[0])
    assert SIG in world.mirror.paths()


# --- bodies of the wrong size or kind: refused (4), nothing applied ----------------------------

# The answer arrived whole by HTTP's own account (a Content-Length that was kept, or a
# close-delimited body), but its size or content is wrong: the mirror is lying or broken.
REFUSED_BODIES = [
    case("head oversized", 0, HEAD, ("oversize", 70000), "more than the 65536 expected"),
    case("head oversized without Content-Length", 0, HEAD, ("oversize-unannounced", 70000), "longer than"),
    case("journal oversized", 0, JOURNAL, ("oversize", 4096), "more than"),
    case("object oversized", 2, O2, ("oversize", 4096), "more than"),
    case("head with a short Content-Length", 0, HEAD, "short-length", "does not verify"),
    case("journal with a short Content-Length", 0, JOURNAL, "short-length", "truncated or padded"),
    case("head as a 200 HTML error page", 0, HEAD, "html", "does not verify"),
    case("head.sig as a 200 HTML error page", 0, SIG, "html", "SSH SIGNATURE"),
    case("journal 206 with the wrong Content-Range", 2, JOURNAL, ("content-range", "bytes 0-99/500"), "wrong range"),
]


@pytest.mark.parametrize("at,path,behaviour,fragment", REFUSED_BODIES)
def test_body_of_wrong_size_or_kind_is_refused_and_applies_nothing(world, at, path, behaviour, fragment):
    if at:
        world.bring_to_seq_2()
    world.mirror.behave[path] = behaviour
    up_applies_nothing(world, "refused", fragment, Template.MARKERS[at])


def test_journal_past_the_signed_length_in_a_206_is_refused(world):
    # The mirror has seq 4's journal, the signed head says seq 2; the 206 runs to the end of the file.
    world.mirror.replace.update({HEAD: world.t.versions[2][HEAD], SIG: world.t.versions[2][SIG]})
    world.mirror.behave[JOURNAL] = "range-to-end"
    up_applies_nothing(world, "refused", "more than", Template.MARKERS[0])
    length = len(world.t.versions[2][JOURNAL])
    assert (JOURNAL, "bytes=0-%d" % (length - 1)) in world.mirror.requests


def test_server_ignoring_range_with_a_rewritten_prefix_is_refused(world):
    world.bring_to_seq_2()
    # Entry 1 rewritten (same length, still valid JSON), the rest as published.
    journal = world.t.versions[4][JOURNAL].replace(b'"author":"alice@example"', b'"author":"alice@examplf"', 1)
    assert journal != world.t.versions[4][JOURNAL]
    world.mirror.replace[JOURNAL] = journal
    world.mirror.behave[JOURNAL] = "ignore-range"
    up_applies_nothing(world, "refused", "does not begin with the journal this host verified",
                       Template.MARKERS[2])


def test_swapped_object_is_refused(world):
    world.bring_to_seq_2()
    world.mirror.replace[O2] = Template.MOTD   # another valid object's bytes, of the same size
    up_applies_nothing(world, "refused", "does not match the signed journal", Template.MARKERS[2])


def test_refused_object_leaves_no_other_object_staged(world):
    # A fresh host needs both objects; they are fetched in hash order, and the second is swapped.
    second = max(Template.MOTD, Template.ISSUE, key=sha)
    world.mirror.replace[Template.object(second)] = min(Template.MOTD, Template.ISSUE, key=sha)
    up_applies_nothing(world, "refused", "does not match the signed journal", Template.MARKERS[0])


def test_object_of_the_wrong_size_is_refused(world):
    world.bring_to_seq_2()
    world.mirror.replace[O2] = Template.ISSUE[:-1]
    line = up_applies_nothing(world, "refused", "does not match the signed journal", Template.MARKERS[2])
    assert re.search(r"\b%d\b" % (len(Template.ISSUE) - 1), line), line   # names the size it got


def test_new_head_with_an_old_journal_is_refused(world):
    # A mirror caught half-way through a sync: seq 4's head, seq 2's journal.
    world.mirror.replace[JOURNAL] = world.t.versions[2][JOURNAL]
    up_applies_nothing(world, "refused", "where the signed head says", Template.MARKERS[0])


# --- heads and signatures an attacker can serve: refused (4) ----------------------------------

def test_replayed_older_signed_head_is_refused_as_rollback(world):
    world.bring_to_seq_2()
    world.mirror.replace.update({HEAD: world.t.versions[1][HEAD], SIG: world.t.versions[1][SIG]})
    up_applies_nothing(world, "refused", "rollback", Template.MARKERS[2])


def test_same_seq_with_another_id_is_refused_as_fork(world):
    # Even signed with the real key: the host verified another entry 2.
    world.bring_to_seq_2()
    lines = world.t.lines[:1]
    lines.append(entry(lines[0], "exec", argv=["/bin/touch", "/tmp/evil"], cwd="/"))
    world.publish(lines)
    up_applies_nothing(world, "refused", "fork", Template.MARKERS[2] + ["/tmp/evil"])


def test_head_of_another_branch_is_refused(world):
    world.mirror.replace.update({HEAD: world.t.canary["head"], SIG: world.t.canary["head.sig"]})
    up_applies_nothing(world, "refused", "is for branch 'canary'", Template.MARKERS[0])


def test_garbage_head_signed_by_the_real_key_is_refused(world):
    world.resign(b"{\"format\":1,\"branch\":\"web\",\"seq\":\n")
    up_applies_nothing(world, "refused", "not valid JSON", Template.MARKERS[0])


def test_non_canonical_head_signed_by_the_real_key_is_refused(world):
    fields = json.loads(world.t.versions[4][HEAD])
    world.resign(json.dumps(fields, sort_keys=True, separators=(", ", ": ")).encode() + b"\n")
    up_applies_nothing(world, "refused", "canonical", Template.MARKERS[0])


def swapped(lines):
    lines = list(lines)
    lines[2], lines[3] = lines[3], lines[2]
    return lines


def test_reordered_journal_signed_by_an_untrusted_key_is_refused(world):
    world.publish(swapped(world.t.lines), key=world.attacker.private)
    up_applies_nothing(world, "refused", "not in allowed_signers", Template.MARKERS[0])


def test_reordered_journal_signed_by_the_real_key_is_refused(world):
    world.publish(swapped(world.t.lines))
    up_applies_nothing(world, "refused", "reordered", Template.MARKERS[0])


def test_signature_by_an_untrusted_key_is_refused(world):
    world.resign(world.t.versions[4][HEAD], key=world.attacker.private)
    up_applies_nothing(world, "refused", "not in allowed_signers", Template.MARKERS[0])


def test_signature_with_a_flipped_byte_is_refused(world):
    armour = world.t.versions[4][SIG].decode().splitlines()
    blob = bytearray(base64.b64decode("".join(armour[1:-1])))
    blob[-1] ^= 1   # the last byte of the Ed25519 signature value
    text = base64.b64encode(bytes(blob)).decode()
    body = "\n".join([armour[0]] + [text[i:i + 70] for i in range(0, len(text), 70)] + [armour[-1]]) + "\n"
    world.mirror.replace[SIG] = body.encode()
    up_applies_nothing(world, "refused", "does not verify", Template.MARKERS[0])


def test_signature_from_another_namespace_is_refused(world):
    world.resign(world.t.versions[4][HEAD], namespace="file")
    up_applies_nothing(world, "refused", "namespace 'file'", Template.MARKERS[0])


def test_expired_head_is_refused(world):
    fields = json.loads(world.t.versions[4][HEAD])
    fields["expires"] = utc(time.time() + 3600)
    world.resign(canon(fields) + b"\n")
    up_applies_nothing(world, "refused", "expired at", Template.MARKERS[0], "--now", "2099-01-01T00:00:00Z")


@pytest.mark.parametrize("options,fragment", [
    ('valid-before="20200101"', "expired at"),
    ('namespaces="other"', "may sign only namespaces"),
], ids=["key past its validity", "key not allowed the namespace"])
def test_key_not_usable_for_this_signature_is_refused(world, keys, tmp_path, options, fragment):
    signers = keys.write_signers(options=options, path=str(tmp_path / "signers"))
    world.host("init", world.mirror.url, "--branch", "web", "--signers", signers, "--force", *SLOW, expect="ok")
    up_applies_nothing(world, "refused", fragment, Template.MARKERS[0])


@pytest.mark.parametrize("path", ["/../etc/x", "/etc/../../x"])
def test_path_traversal_in_a_signed_snap_is_refused_before_anything_applies(world, path):
    # A compromised author: the journal is signed with the real key, and entry 1 is harmless.
    content = b"owned\n"
    lines = [entry(None, "exec", argv=["/bin/touch", "/tmp/first"], cwd="/")]
    lines.append(entry(lines[0], "snap", files=[file_record(path, content)]))
    world.publish(lines, objects=[content])
    up_applies_nothing(world, "refused", "not an absolute, normalised path", ["/tmp/first", "/x", "/etc/x"])
    assert not os.path.exists(os.path.join(os.path.dirname(world.host.root), "x"))


# --- what a hostile mirror cannot stop: these succeed -------------------------------------

def test_redirect_to_a_good_path_is_followed(world):
    world.mirror.behave[HEAD] = ("redirect", "/moved" + HEAD)
    world.host("up", expect="ok")
    assert open(world.host.path("/etc/issue"), "rb").read() == Template.ISSUE
    assert os.path.exists(world.host.path("/tmp/four"))
    assert world.mirror.paths()[:2] == [HEAD, "/moved" + HEAD]


def test_server_ignoring_range_with_the_right_prefix_is_accepted(world):
    world.bring_to_seq_2()
    world.mirror.behave[JOURNAL] = "ignore-range"
    world.host("up", expect="ok")
    assert os.path.exists(world.host.path("/tmp/four"))
    assert (JOURNAL, "bytes=%d-%d" % (len(world.t.versions[2][JOURNAL]), len(world.t.versions[4][JOURNAL]) - 1)) \
        in world.mirror.requests


def test_hostile_first_mirror_falls_back_to_a_good_second(world, template, keys, tmp_path):
    good = HostileMirror(template.repo)
    try:
        world.mirror.behave[HEAD] = "html"
        world.host("init", world.mirror.url, good.url, "--branch", "web", "--signers", keys.signers, "--force",
                   *SLOW, expect="ok")
        world.host("up", expect="ok")
        assert os.path.exists(world.host.path("/tmp/four"))
        assert HEAD in world.mirror.paths() and JOURNAL not in world.mirror.paths()
        assert JOURNAL in good.paths()
    finally:
        good.stop()


def test_after_a_refusal_the_next_up_against_a_good_mirror_succeeds(world):
    world.bring_to_seq_2()
    world.mirror.replace[O2] = Template.MOTD
    world.host("up", expect="refused")
    world.mirror.replace.clear()
    world.host("up", expect="ok")
    assert open(world.host.path("/etc/issue"), "rb").read() == Template.ISSUE
    assert world.host.status()["applied_seq"] == 4


# --- a hostile target tree: links lead back inside the root ---------------------------------
# Legitimate journals signed by the real key; the links were planted in the host's root.

@pytest.mark.parametrize("kind", ["absolute", "relative"])
def test_snap_through_a_symlink_lands_inside_the_root(world, tmp_path, kind):
    outside = str(tmp_path / "outside")
    os.makedirs(outside)
    target = outside if kind == "absolute" else "../" * 30 + outside.lstrip("/")
    os.symlink(target, world.host.path("/opt"))
    world.publish([entry(None, "snap", files=[file_record("/opt/x", b"confined\n")])], objects=[b"confined\n"])
    world.host("up", expect="ok")
    assert not os.path.exists(os.path.join(outside, "x"))
    inside = world.host.path(outside + "/x")
    assert open(inside, "rb").read() == b"confined\n"
    assert not os.path.islink(inside)


def test_exec_with_a_cwd_symlinked_outside_runs_inside_the_root(world, tmp_path):
    outside = str(tmp_path / "outside")
    os.makedirs(outside)
    os.makedirs(world.host.path(outside))
    os.symlink(outside, world.host.path("/srv"))
    world.publish([entry(None, "exec", argv=["/bin/touch", "here"], cwd="/srv")])
    world.host("up", expect="ok")
    assert not os.path.exists(os.path.join(outside, "here"))
    assert os.path.exists(world.host.path(outside + "/here"))


def test_mirror_leaves_no_thread_or_socket_behind(template):
    before = set(threading.enumerate())
    server = HostileMirror(template.repo)
    server.behave[HEAD] = "trickle"
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1].strip("/")))) as c:
        c.sendall(b"GET /branches/web/head HTTP/1.1\r\nHost: x\r\n\r\n")
        c.recv(100)
    server.stop()
    assert set(threading.enumerate()) <= before
    assert server.listener.fileno() == -1


def test_304_to_an_unconditional_request_is_refused(world):
    # A fresh host sends no validator, so "not modified" can only be a broken or lying mirror.
    world.mirror.behave[HEAD] = ("status", 304)
    up_applies_nothing(world, "refused", "not conditional", Template.MARKERS[0])


def test_server_ignoring_range_on_a_journal_longer_than_signed_is_accepted(world):
    # A ci that died after appending leaves bytes past the head: a host reads the signed bytes only.
    world.bring_to_seq_2()
    world.mirror.replace[JOURNAL] = world.t.versions[4][JOURNAL] + b'{"half an entry'
    world.mirror.behave[JOURNAL] = "ignore-range"
    world.host("up", expect="ok")
    assert os.path.exists(world.host.path("/tmp/four"))


def test_state_directory_linked_outside_the_root_stays_inside(template, mirror, keys, tmp_path, busybox_root):
    from conftest import Host
    outside = str(tmp_path / "outside")
    os.makedirs(outside)
    host = Host(str(tmp_path / "linked-host"))
    busybox_root(host.root)
    os.symlink(outside, host.path("/var"))
    host.init(mirror.url, keys, *SLOW)
    host("up", expect="ok")
    assert os.listdir(outside) == []
    assert os.path.exists(host.path(outside + "/lib/isconf/history"))


@pytest.mark.parametrize("plant", ["/dev/zero", "fifo", "/etc/passwd"])
def test_a_planted_passwd_file_is_not_followed_out_of_the_root(world, plant):
    # Owner names are looked up in the target's own /etc/passwd: never a device, a FIFO or the host's file.
    passwd = world.host.path("/etc/passwd")
    os.unlink(passwd)
    if plant == "fifo":
        os.mkfifo(passwd)
    else:
        os.symlink(plant, passwd)
    world.publish([entry(None, "snap", files=[dict(file_record("/etc/x", b"owned\n"), user="nobody", uid=1234)])],
                  objects=[b"owned\n"])
    world.host("up", expect="ok", timeout=RUN_TIMEOUT)
    assert os.stat(world.host.path("/etc/x")).st_uid == 1234


def test_endless_chunked_answer_to_a_range_request_is_cut_at_the_signed_length(world):
    # A server that ignores Range and streams for ever: the host reads the signed bytes and hangs up.
    world.mirror.behave[JOURNAL] = "chunked-endless"
    world.host("up", expect="ok", timeout=RUN_TIMEOUT)
    assert os.path.exists(world.host.path("/tmp/four"))


def test_a_giant_etag_is_ignored_and_costs_nothing_later(world):
    # Validators are never kept or sent: the next run is the head alone, unconditional.
    world.mirror.behave[HEAD] = "giant-etag"
    world.host("up", expect="ok")
    del world.mirror.requests[:]
    world.host("up", expect="ok")
    assert world.mirror.paths() == [HEAD]
    assert not os.path.exists(world.host.state("etags.json"))


def test_a_link_with_dotdot_below_a_missing_directory_cannot_place_state_outside(template, mirror, keys,
                                                                                  tmp_path, busybox_root):
    from conftest import Host
    host = Host(str(tmp_path / "dotdot-host"))
    busybox_root(host.root)
    escape = str(tmp_path / "escaped")
    os.symlink("missing/" + "../" * 20 + escape.lstrip("/"), host.path("/var"))
    proc = host("init", mirror.url, "--branch", "web", "--signers", keys.signers)
    assert proc.returncode == 7 and "No such file" in error_line(proc)
    assert not os.path.exists(escape)
