"""What each entry kind means lives in one place: its class in isconf.KINDS (STYLE.md)."""

import importlib.util
import re

import pytest

from conftest import ISCONF


def fresh_isconf():
    """A private copy of the module, so a test may add a kind without touching the session's."""
    spec = importlib.util.spec_from_file_location("isconf_kinds", ISCONF)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def entry(isconf, **fields):
    envelope = {"seq": 1, "prev": isconf.ZERO_ID, "time": "2024-01-01T00:00:00Z", "author": "a", "message": ""}
    return isconf.Entry.parse(isconf.canonical(dict(envelope, **fields)), "entry")


SAMPLES = {
    "exec": {"argv": ["/bin/echo", "a b"], "cwd": "/"},
    "snap": {"files": [{"path": "/etc/motd", "type": "file", "mode": 0o644, "mtime_ns": 0, "size": 3, "uid": 0,
                        "gid": 0, "user": "root", "group": "root", "object": "ab" * 32}]},
    "reboot": {},
}


def test_the_table_holds_exec_snap_and_reboot_in_order(isconf):
    assert list(isconf.KINDS) == ["exec", "snap", "reboot"]


@pytest.mark.parametrize("name", ["exec", "snap", "reboot"])
def test_every_kind_has_its_fields_check_objects_summary_and_apply(isconf, name):
    kind = isconf.KINDS[name]
    assert isinstance(kind, isconf.Kind) and kind.name == name
    assert isinstance(kind.fields, dict)
    for method in ("check", "objects", "summary", "apply"):
        assert callable(getattr(kind, method))
    e = entry(isconf, kind=name, **SAMPLES[name])
    assert e.interpret().meaning() is kind
    assert e.summary() == kind.summary(e.fields) and e.summary().split()[0] == name


@pytest.mark.parametrize("name", ["exec", "snap", "reboot"])
def test_an_entry_accepts_exactly_its_kinds_fields(isconf, name):
    # the fields come from the kind's class alone: one more is refused (a newer isconf's field)
    e = entry(isconf, kind=name, extra=1, **SAMPLES[name])
    with pytest.raises(isconf.NeedsNewer, match="unknown fields extra"):
        e.interpret()


def test_only_snap_needs_objects(isconf):
    assert entry(isconf, kind="snap", **SAMPLES["snap"]).objects() == [("ab" * 32, 3)]
    assert entry(isconf, kind="exec", **SAMPLES["exec"]).objects() == []
    assert entry(isconf, kind="reboot").objects() == []


def test_an_unknown_kind_is_refused_naming_the_kinds_in_the_table(isconf):
    with pytest.raises(isconf.NeedsNewer, match="kind 'note' is not exec, snap or reboot; isconf .* needs a newer"):
        entry(isconf, kind="note", text="hi").interpret()


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
    assert note.summary() == "note hi" and note.objects() == []
    assert note.meaning().apply(None, note) is False
    with pytest.raises(isconf.NeedsNewer, match="kind 'other' is not exec, snap, reboot or note"):
        entry(isconf, kind="other").interpret()


def test_no_code_outside_the_kinds_branches_on_an_entry_kind():
    with open(ISCONF) as f:
        source = f.read()
    assert not re.findall(r"\.kind\s*(?:[!=]=|in\b|not in\b)", source)
    assert "KIND_FIELDS" not in source
