"""What each entry kind and each file type inside a snap means lives in one place: its class, in
isconf.KINDS and isconf.FILE_TYPES (STYLE.md).  A new kind or file type is one class."""

import importlib.util
import os
import stat

import pytest

from conftest import ISCONF


def fresh_isconf():
    """A private copy of the module, so a test may add a kind or a file type without touching the session's."""
    spec = importlib.util.spec_from_file_location("isconf_kinds", ISCONF)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def entry(isconf, **fields):
    envelope = {"seq": 1, "prev": isconf.ZERO_ID, "time": "2024-01-01T00:00:00Z", "author": "a", "message": ""}
    return isconf.Entry.parse(isconf.canonical(dict(envelope, **fields)), "entry")


FILE = {"path": "/etc/motd", "type": "file", "mode": 0o644, "mtime_ns": 0, "size": 3, "uid": 0, "gid": 0,
        "user": "root", "group": "root", "object": "ab" * 32}
SAMPLES = {
    "exec": {"argv": ["/bin/echo", "a b"], "cwd": "/"},
    "snap": {"files": [FILE]},
    "reboot": {},
    "retract": {"retracted_seq": 1, "retracted_id": "cd" * 32},
}


def test_the_kinds_table_holds_exec_snap_reboot_and_retract_in_order(isconf):
    assert list(isconf.KINDS) == ["exec", "snap", "reboot", "retract"]


def test_the_file_types_table_holds_file_hardlink_symlink_and_dir_in_order(isconf):
    assert list(isconf.FILE_TYPES) == ["file", "hardlink", "symlink", "dir"]
    assert all(isinstance(t, isconf.FileType) and t.name == n for n, t in isconf.FILE_TYPES.items())


@pytest.mark.parametrize("name", ["exec", "snap", "reboot", "retract"])
def test_an_entry_means_what_its_kinds_class_says(isconf, name):
    kind = isconf.KINDS[name]
    assert isinstance(kind, isconf.Kind) and kind.name == name
    e = entry(isconf, kind=name, **SAMPLES[name])
    assert e.interpret().meaning() is kind
    assert e.summary() == kind.summary(e.fields) and e.summary().split()[0] == name


@pytest.mark.parametrize("name", ["exec", "snap", "reboot", "retract"])
def test_an_entry_accepts_exactly_its_kinds_fields(isconf, name):
    # the fields come from the kind's class alone: one more is refused (a newer isconf's field)
    e = entry(isconf, kind=name, extra=1, **SAMPLES[name])
    with pytest.raises(isconf.NeedsNewer, match="unknown fields extra"):
        e.interpret()


def test_only_snap_needs_objects_and_leaves_files_on_disk(isconf):
    snap = entry(isconf, kind="snap", **SAMPLES["snap"])
    assert snap.objects() == [("ab" * 32, 3)] and snap.object_path("ab" * 32) == "/etc/motd"
    assert snap.installs() == [FILE]
    for name in ("exec", "reboot", "retract"):
        other = entry(isconf, kind=name, **SAMPLES[name])
        assert other.objects() == [] and other.installs() == []


def test_a_sparse_files_object_is_its_data_extents_only(isconf):
    sparse = dict(FILE, size=100, extents=[[0, 10], [50, 5]])
    assert entry(isconf, kind="snap", files=[sparse]).objects() == [("ab" * 32, 15)]


def test_only_a_reboot_waits_for_up_r_and_holds_the_host_in_the_reboot_state(isconf):
    reboot = entry(isconf, kind="reboot")
    code, why = reboot.waits(allow_reboot=False)
    assert code == isconf.EXIT_REBOOT and why == "is a reboot"  # the run adds reboot_advice (test_messages)
    assert reboot.waits(allow_reboot=True) is None and reboot.holds() == "reboot" and "reboot" in isconf.STATES
    for name in ("exec", "snap"):
        other = entry(isconf, kind=name, **SAMPLES[name])
        assert other.waits(allow_reboot=False) is None and other.holds() is None


def test_applying_a_reboot_asks_the_run_to_reboot(isconf):
    assert entry(isconf, kind="reboot").apply(None) == isconf.REBOOT


def test_only_a_retract_retires_an_entry_and_applying_it_changes_nothing(isconf):
    retract = entry(isconf, kind="retract", **SAMPLES["retract"])
    assert retract.retracts() == (1, "cd" * 32) and retract.apply(None) == isconf.DONE
    assert all(entry(isconf, kind=n, **SAMPLES[n]).retracts() is None for n in ("exec", "snap", "reboot"))


def test_an_unknown_kind_is_refused_naming_the_kinds_in_the_table(isconf):
    with pytest.raises(isconf.NeedsNewer, match="kind 'note' is not exec, snap, reboot or retract; isconf .* needs a newer"):
        entry(isconf, kind="note", text="hi").interpret()


def test_an_unknown_file_type_is_refused_naming_the_types_in_the_table(isconf):
    with pytest.raises(isconf.NeedsNewer, match="file type 'door' is not file, hardlink, symlink or dir"):
        entry(isconf, kind="snap", files=[{"path": "/x", "type": "door"}]).interpret()


def test_a_new_kind_is_one_class():
    isconf = fresh_isconf()
    note = entry(isconf, kind="note", text="hi")
    with pytest.raises(isconf.NeedsNewer):
        note.interpret()

    @isconf.entry_kind
    class NoteKind(isconf.Kind):
        name = "note"
        fields = {"text": str}

        def summary(self, fields):
            return "note " + fields["text"]

    note = entry(isconf, kind="note", text="hi")
    assert note.summary() == "note hi" and note.objects() == [] and note.installs() == []
    assert note.waits(allow_reboot=False) is None and note.apply(None) == isconf.DONE
    with pytest.raises(isconf.NeedsNewer, match="kind 'other' is not exec, snap, reboot, retract or note"):
        entry(isconf, kind="other").interpret()


def test_a_new_file_type_is_one_class(tmp_path):
    # A FIFO, as a toy type: the author captures it, a host installs it, verify finds it drifted.
    isconf = fresh_isconf()
    fifo_record = {"path": "/run/pipe", "type": "fifo", "mode": 0o600, "uid": 0, "gid": 0, "user": "root",
                   "group": "root"}
    with pytest.raises(isconf.NeedsNewer):
        entry(isconf, kind="snap", files=[fifo_record]).interpret()

    @isconf.file_type
    class Fifo(isconf.FileType):
        name, label, ifmt = "fifo", "FIFO", stat.S_IFIFO
        fields = dict(isconf.OWNER_FIELDS, mode=int)

        def capture(self, rootpath, path, st, links, owners, store):
            return dict(owners.record(st), path=path, type=self.name, mode=stat.S_IMODE(st.st_mode))

        def install(self, site, dfd, name, record):
            isconf.replace_at(dfd, name, lambda tmp: os.mkfifo(tmp, record["mode"], dir_fd=dfd), locked=True)

    src, dst = tmp_path / "src", tmp_path / "dst"
    os.makedirs(str(src / "run"))
    os.makedirs(str(dst))
    os.mkfifo(str(src / "run/pipe"), 0o600)
    rootpath = isconf.RootPath(str(src))
    record = isconf.FileType.capture_path(rootpath, "/run/pipe", {}, isconf.Owners(rootpath), None)
    assert record == dict(fifo_record, user=record["user"], group=record["group"])
    snap = entry(isconf, kind="snap", files=[record]).interpret()
    assert snap.summary() == "snap /run/pipe" and snap.objects() == []

    site_root = isconf.RootPath(str(dst))
    isconf.FileType.install_record(isconf.Site(site_root, isconf.Owners(site_root), None), record)
    assert stat.S_ISFIFO(os.lstat(str(dst / "run/pipe")).st_mode)
    files = isconf.FileType.last_records([snap.installs()])
    assert isconf.disk_drifts(site_root, files, False) == []
    os.chmod(str(dst / "run/pipe"), 0o644)
    assert [d["what"] for d in isconf.disk_drifts(site_root, files, False)] == ["mode"]
    os.unlink(str(dst / "run/pipe"))
    assert [d["what"] for d in isconf.disk_drifts(site_root, files, False)] == ["missing"]
