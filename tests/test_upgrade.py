"""The agent upgrades itself and its interpreter through the journal (rules 6 and 12).

The agent under test runs from a file inside the host root, /usr/local/sbin/isconf.py,
with --root set to that root: a snap of that path replaces the running agent, exactly
as a snap of the agent's own path does on a host run with --root /.
"""

import fcntl
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest

from conftest import AGENT, AUTHOR, append_unknown_entry, build, error_line, put, undated

def run_agent(host_root, *args, python=sys.executable, env=None, pass_fds=(), wrap=()):
    """The agent installed inside the root, run by `python` (under the command wrap), against that root."""
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "ISCONF_AUTHOR": AUTHOR, "LC_ALL": "C.UTF-8"}
    base.update(env or {})
    argv = list(wrap) + [python, "-I", os.path.join(host_root, AGENT.lstrip("/")), "--root", host_root]
    proc = subprocess.run(argv + list(args), env=base, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, timeout=300, pass_fds=pass_fds)
    proc.out, proc.err = undated(proc.stdout.decode("utf-8", "replace")), undated(proc.stderr.decode("utf-8", "replace"))
    return proc


@pytest.fixture
def src(tmp_path):
    return str(tmp_path / "src")


def snap_agent(src, text):
    """An author step: snap the agent at AGENT with this content."""
    put(src, AGENT, text)
    return ["--root", src, "snap", AGENT]


def touch(name):
    return ["exec", "--no-run", "--", "/bin/touch", "/tmp/" + name]


@pytest.fixture
def agent_host(host, busybox_root, server, keys):
    """A busybox host root running agent version 1.0.0 from inside itself."""
    busybox_root(host.root)
    put(host.root, AGENT, build("1.0.0"))
    host.init(server.url, keys)
    return host


def run_by(host):
    """seq -> (agent version, python version) of whoever ran each transaction, from log --json."""
    log = json.loads(run_agent(host.root, "log", "--json").out)
    return {e["seq"]: e["run_by"] and (e["run_by"]["agent"], e["run_by"]["python"]) for e in log}


def agent_text(host):
    with open(host.path(AGENT)) as f:
        return f.read()


def test_self_test_prints_the_version_and_reads_the_host(agent_host):
    ok = run_agent(agent_host.root, "--self-test")
    assert ok.returncode == 0 and ok.out == "isconf 1.0.0 self-test ok\n", ok.err
    with open(agent_host.state("state-format"), "w") as f:
        f.write("99\n")  # a state this file cannot read: the self-test says so
    bad = run_agent(agent_host.root, "--self-test")
    assert bad.returncode == 7 and "written by a newer isconf" in error_line(bad)


def test_the_self_test_verifies_its_built_in_signature(tmp_path):
    # A build whose signature code is broken fails its self-test: altered message, same signature.
    broken = put(str(tmp_path), "/isconf.py", build("1.1.0", ("verifies an SSH signature",
                                                              "verifies an SSH signaturE")))
    proc = subprocess.run([sys.executable, "-I", broken, "--self-test", "--root", str(tmp_path)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.returncode == 4 and b"self-test ok" not in proc.stdout


def test_two_upgrades_in_one_up_each_new_version_takes_over(agent_host, author, src):
    author.commit(snap_agent(src, build("1.1.0")), touch("a"))
    author.commit(snap_agent(src, build("1.2.0")), touch("b"))  # the snap takes the content now: two check-ins
    up = run_agent(agent_host.root, "up")
    assert up.returncode == 0, up.err
    assert up.out.count("re-executing") == 2
    assert os.path.exists(agent_host.path("/tmp/a")) and os.path.exists(agent_host.path("/tmp/b"))
    python = sys.version.split()[0]
    assert run_by(agent_host) == {1: ("1.0.0", python), 2: ("1.1.0", python), 3: ("1.1.0", python),
                                  4: ("1.2.0", python)}
    status = json.loads(run_agent(agent_host.root, "status", "--json").out)
    assert status["agent"] == "1.2.0" and status["last_run_by"]["agent"] == "1.2.0"
    assert status["applied_seq"] == 4 and status["pending"] == 0
    assert (status["last_run"]["result"], status["last_run"]["applied"]) == ("ok", 4)  # one run, across re-execs
    assert agent_text(agent_host) == build("1.2.0")


@pytest.mark.parametrize("broken, quoted", [
    (("import sys\n", "import sys\ndef (:\n"), "SyntaxError"),
    (('show("isconf %s self-test ok" % __version__)', 'show("all good")'), "all good"),
    (("verifies an SSH signature", "verifies an SSH signaturE"), "signature"),
], ids=["syntax-error", "no-version-line", "failing-check"])
def test_a_broken_build_fails_its_transaction_and_a_later_good_one_applies_after_skip(
        broken, quoted, agent_host, author, src):
    author.commit(snap_agent(src, build("1.1.0", broken)), touch("after"))
    before = agent_text(agent_host)
    failed = run_agent(agent_host.root, "up")
    assert failed.returncode == 1, failed.err
    line = error_line(failed)
    assert "transaction 1 failed: new agent %s not installed: the self-test" % AGENT in line and quoted in line
    assert agent_text(agent_host) == before
    assert not os.path.exists(agent_host.path("/tmp/after"))
    assert os.listdir(agent_host.state("objects")) and not glob.glob(agent_host.state("objects", "*.agent"))
    again = run_agent(agent_host.root, "up")  # halted there: tried again, still refused
    assert again.returncode == 1 and agent_text(agent_host) == before

    author.commit(snap_agent(src, build("1.2.0")), touch("good"))
    assert run_agent(agent_host.root, "skip", "1", "-m", "broken build").returncode == 0
    up = run_agent(agent_host.root, "up")
    assert up.returncode == 0, up.err
    assert os.path.exists(agent_host.path("/tmp/after")) and os.path.exists(agent_host.path("/tmp/good"))
    assert run_by(agent_host)[4][0] == "1.2.0" and agent_text(agent_host) == build("1.2.0")


def test_the_host_lock_is_held_across_the_re_exec(agent_host, author, src):
    # A contender polls the lock from just before the upgrade to just after it: it must never get it.
    author.commit(touch("go"), snap_agent(src, build("1.1.0")), ["exec", "--no-run", "--", "/bin/sh", "-c",
                                                                  "touch /tmp/stop; sleep 1"])
    lock = os.open(agent_host.state("lock"), os.O_RDWR)
    won, done = [], threading.Event()

    def contend():
        while not os.path.exists(agent_host.path("/tmp/go")) and not done.is_set():
            pass
        while not os.path.exists(agent_host.path("/tmp/stop")) and not done.is_set():
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            won.append(True)
            fcntl.flock(lock, fcntl.LOCK_UN)

    thread = threading.Thread(target=contend)
    thread.start()
    try:
        up = run_agent(agent_host.root, "up")
    finally:
        done.set()
        thread.join()
        os.close(lock)
    assert up.returncode == 0 and "re-executing" in up.out, up.err
    assert not won
    assert run_by(agent_host)[3][0] == "1.1.0"


@pytest.mark.parametrize("which", ["another-file", "the-lock-file-not-holding-it"])
def test_a_lock_descriptor_named_in_the_environment_grants_nothing(which, agent_host, author):
    # Only the descriptor that holds this host's flock is taken over; else the lock is taken as usual: busy.
    author.commit(touch("a"))
    holder = os.open(agent_host.state("lock"), os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    named = os.open(agent_host.state("lock") if which != "another-file" else agent_host.path("/etc/passwd"),
                    os.O_RDWR)
    try:
        up = run_agent(agent_host.root, "up", env={"ISCONF_LOCK_FD": str(named)}, pass_fds=(named,))
    finally:
        os.close(named)
        os.close(holder)
    assert up.returncode == 6 and "busy" in error_line(up)
    assert not os.path.exists(agent_host.path("/tmp/a"))


def test_a_re_exec_never_repeats_for_the_same_transaction(agent_host, author, src):
    # As if this process had already re-executed after transaction 1: it carries on itself instead.
    author.commit(snap_agent(src, build("1.1.0")), touch("after"))
    entry_id = hashlib.sha256(author.journal().splitlines()[0]).hexdigest()  # an entry's id: its bytes' hash
    up = run_agent(agent_host.root, "up", env={"ISCONF_REEXECS": entry_id})
    assert up.returncode == 0, up.err
    assert "already re-executed after transaction 1" in up.err and "re-executing" not in up.out
    assert run_by(agent_host)[2][0] == "1.0.0"


def test_plain_transactions_do_not_re_execute(agent_host, author):
    author.commit(touch("a"), touch("b"))
    up = run_agent(agent_host.root, "up")
    assert up.returncode == 0 and "re-executing" not in up.out and "self-test" not in up.out, up.err


def test_from_outside_the_root_a_snap_of_the_agent_path_is_just_a_snap(host, busybox_root, server, keys, author,
                                                                        src):
    # The agent runs from the test's isconf.py, not from the target: nothing there replaces it.
    busybox_root(host.root)
    host.init(server.url, keys)
    author.commit(snap_agent(src, build("1.1.0", ("import sys\n", "import sys\ndef (:\n"))), touch("after"))
    up = host("up", expect="ok")
    assert "re-executing" not in up.out and "self-test" not in up.out
    assert os.path.exists(host.path("/tmp/after"))


def pyenv(minor):
    found = sorted(glob.glob("/root/.pyenv/versions/%s.*/bin/python3" % minor))
    if not found:
        pytest.fail("no Python %s under /root/.pyenv: these tests swap interpreters under the agent" % minor)
    return found[-1]


def repoint(python):
    return ["exec", "--no-run", "--", "/bin/ln", "-sf", python, "/usr/bin/python3"]


@pytest.fixture
def swap_host(agent_host, busybox_root):
    """The agent host with busybox's ln, and /usr/bin/python3 a link to pyenv's 3.11 (absolute:
    it works from outside the root, where the agent runs it)."""
    os.symlink("busybox", agent_host.path("/bin/ln"))
    os.makedirs(agent_host.path("/usr/bin"))
    os.symlink(pyenv("3.11"), agent_host.path("/usr/bin/python3"))
    return agent_host


def test_an_interpreter_upgrade_re_executes_under_the_new_one(swap_host, author):
    old, new = pyenv("3.11"), pyenv("3.12")
    author.commit(touch("a"), repoint(new), touch("b"))
    up = run_agent(swap_host.root, "up", python=swap_host.path("/usr/bin/python3"))
    assert up.returncode == 0, up.err
    assert "re-executing" in up.out
    version = lambda p: p.split("/versions/")[1].split("/")[0]  # noqa: E731
    seen = run_by(swap_host)
    assert seen[1][1] == seen[2][1] == version(old) and seen[3][1] == version(new)
    log = json.loads(run_agent(swap_host.root, "log", "--json").out)
    assert os.path.realpath(new) == [e for e in log if e["seq"] == 3][0]["run_by"]["python_path"]


def test_a_standard_library_upgrade_alone_re_executes(agent_host, author, busybox_root):
    # A package upgrade that leaves the interpreter's binary alone but renames new modules into its
    # standard library: the running agent must not import from a library it did not load.
    python = pyenv("3.11")
    home = os.path.dirname(os.path.dirname(python))
    copy = agent_host.path("/opt/python")
    os.makedirs(os.path.dirname(copy))
    subprocess.run(["cp", "-al", home, copy], check=True)  # hard links: the pyenv files are never written
    stdlib = "/opt/python/lib/python3.11"
    author.commit(touch("a"), ["exec", "--no-run", "--", "/bin/touch", stdlib + "/isconf_new_module.py"], touch("b"))
    up = run_agent(agent_host.root, "up", python=os.path.join(copy, "bin", os.path.basename(python)))
    assert up.returncode == 0, up.err
    assert "after transaction 2: re-executing" in up.out, up.out
    assert os.path.exists(agent_host.path("/tmp/b"))


def late_module_paths(isconf, stdlib):
    """The file (or package directory) of each module the agent imports late, inside stdlib."""
    found = []
    for name in isconf.LATE_MODULES:
        path = os.path.join(stdlib, *name.split("."))
        found.append(path if os.path.isdir(path) else path + ".py")
    return found


def test_what_the_agent_imports_late_is_imported_before_the_first_transaction_runs(agent_host, author, isconf):
    # Rule 6: a first exec removes from the interpreter's standard library every module the agent imports
    # late; the run still applies everything, and the changed interpreter fails the self-test (which imports
    # them), so the agent carries on in the process that has them instead of re-executing into one without.
    python = pyenv("3.11")
    home = os.path.dirname(os.path.dirname(python))
    copy = agent_host.path("/opt/python")
    os.makedirs(os.path.dirname(copy))
    subprocess.run(["cp", "-al", home, copy], check=True)  # hard links: the pyenv files are never written
    inside = [p.replace(copy, "/opt/python", 1)
              for p in late_module_paths(isconf, os.path.join(copy, "lib", "python3.11"))]
    assert all(os.path.exists(agent_host.path(p)) for p in inside), inside
    remove = " && ".join("/bin/busybox mv %s %s.gone" % (p, p) for p in inside)
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", remove], touch("b"))
    agent_python = os.path.join(copy, "bin", os.path.basename(python))
    up = run_agent(agent_host.root, "up", python=agent_python)
    assert up.returncode == 0, up.err
    assert not any(os.path.exists(agent_host.path(p)) for p in inside)
    assert os.path.exists(agent_host.path("/tmp/b"))
    assert "fails its self-test" in up.err and "re-executing" not in up.out, up.err
    again = run_agent(agent_host.root, "up", python=agent_python)  # an up-to-date run needs none of them
    assert again.returncode == 0, again.err


# Run in process by the script under test's interpreter: which late modules are missing as each
# transaction's command starts (isconf.run_command, called through), and after an up-to-date run.
AT_FIRST_COMMAND = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import isconf
missing = lambda: [m for m in isconf.LATE_MODULES if getattr(isconf, m.partition(".")[0]) is not sys.modules.get(
    m.partition(".")[0]) or m not in sys.modules]
seen, run_command = [], isconf.run_command
def recording(*args, **kw):
    seen.append(missing())
    return run_command(*args, **kw)
isconf.run_command = recording
code = isconf.main(["--root", sys.argv[2], "-q", "up"])
sys.stderr.write(json.dumps({"code": code, "at_commands": seen, "after": missing(),
                             "late": isconf.LATE_MODULES}) + "\n")
"""


def test_an_up_to_date_run_imports_nothing_late_and_a_transaction_starts_with_all_of_it(agent_host, author):
    def up():
        proc = subprocess.run([sys.executable, "-I", "-c", AT_FIRST_COMMAND, os.path.dirname(agent_host.path(AGENT)),
                               agent_host.root], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        return json.loads(proc.stderr.decode().splitlines()[-1])
    author.commit(touch("a"), touch("b"))
    first = up()
    assert first["code"] == 0 and first["at_commands"] == [[], []], first
    again = up()
    assert again["code"] == 0 and again["at_commands"] == [], again
    assert again["after"] == list(again["late"]), again  # none of them imported


def test_an_interpreter_the_agent_cannot_run_under_is_warned_about_and_the_run_carries_on(swap_host, author):
    python2 = glob.glob("/root/.pyenv/versions/2.*/bin/python")
    if not python2:
        pytest.skip("no Python 2 under /root/.pyenv")
    author.commit(repoint(python2[0]), touch("b"))
    up = run_agent(swap_host.root, "up", python=swap_host.path("/usr/bin/python3"))
    assert up.returncode == 0, up.err
    assert "interpreter changed on disk, but this agent fails its self-test" in up.err
    assert "re-executing" not in up.out
    assert run_by(swap_host)[2][1].startswith("3.11.")


def test_a_check_in_can_carry_a_new_agent_and_entries_only_it_understands(agent_host, author, keys, src):
    # Rule 11: 1.0.0 verifies the whole journal, applies the new agent, and 1.1.0 takes the entry 1.0.0 cannot read.
    old = "\n\nclass Entry(object):"  # a new kind is one class (STYLE: one home per kind)
    new = build("1.1.0", (old, '\n\n@entry_kind\nclass NoteKind(Kind):\n    name = "note"\n    fields = {"text": str}\n'
                            + old))
    author.commit(snap_agent(src, new), touch("a"))
    append_unknown_entry(author, keys, kind="note", text="a kind only 1.1.0 knows")
    author.commit(touch("b"))
    up = run_agent(agent_host.root, "up")
    assert up.returncode == 0, up.err
    assert os.path.exists(agent_host.path("/tmp/a")) and os.path.exists(agent_host.path("/tmp/b"))
    python = sys.version.split()[0]
    assert run_by(agent_host) == {1: ("1.0.0", python), 2: ("1.1.0", python), 3: ("1.1.0", python),
                                  4: ("1.1.0", python)}


def test_a_check_in_can_carry_a_new_agent_and_an_entry_using_a_field_only_it_knows(agent_host, author, keys, src):
    old = 'fields = {"argv": list, "cwd": str}'
    new = build("1.1.0", (old, 'fields = {"argv": list, "cwd": str, "note": str}'))
    author.commit(snap_agent(src, new))
    append_unknown_entry(author, keys, kind="exec", argv=["/bin/touch", "/tmp/noted"], cwd="/", note="1.1.0 only")
    up = run_agent(agent_host.root, "up")
    assert up.returncode == 0, up.err
    assert os.path.exists(agent_host.path("/tmp/noted"))
    python = sys.version.split()[0]
    assert run_by(agent_host) == {1: ("1.0.0", python), 2: ("1.1.0", python)}


def test_without_the_new_agent_the_old_one_halts_at_the_entry_it_cannot_read(agent_host, author, keys):
    author.commit(touch("a"))
    append_unknown_entry(author, keys, kind="note", text="a kind only 1.1.0 knows")
    up = run_agent(agent_host.root, "up")
    assert up.returncode == 10 and "needs a newer isconf" in error_line(up)
    assert os.path.exists(agent_host.path("/tmp/a"))


SHEBANG = "#!/usr/bin/env python3\n"
WITHOUT_USR_BIN_PYTHON3 = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           'mount --bind /dev/null /usr/bin/python3 && exec "$@"', "sh"]  # this process alone


@pytest.fixture
def versioned_python(agent_host):
    """A real interpreter copied inside the host root, so that an exec can remove it as a dist-upgrade
    purges the /usr/bin/python3.11 an admin or an old cron line started the agent by."""
    copy = agent_host.path("/opt/python3.11")
    os.makedirs(os.path.dirname(copy))
    shutil.copy2(pyenv("3.11"), copy)
    assert subprocess.run([copy, "-I", "-c", "import json"]).returncode == 0  # it runs from where it is
    return copy


def purge_then_upgrade(author, src, shebang):
    """Remove the interpreter the agent runs under, then ship agent 1.1.0 (its #! line shebang)."""
    author.commit(["exec", "--no-run", "--", "/bin/rm", "/opt/python3.11"],
                  snap_agent(src, build("1.1.0", (SHEBANG, shebang))), touch("after"))


@pytest.mark.parametrize("how", ["shebang", "env-shebang", "usr-bin-python3"])
def test_an_interpreter_purged_under_the_agent_falls_back_to_the_agent_files_own(
        how, agent_host, versioned_python, author, src, tmp_path):
    # Its #! line names an interpreter (or, through env, one found in $PATH), else /usr/bin/python3.
    fallback = {"shebang": pyenv("3.12"), "env-shebang": str(tmp_path / "bin" / "python3"),
                "usr-bin-python3": "/usr/bin/python3"}[how]
    shebang = {"shebang": "#!%s\n" % fallback, "env-shebang": SHEBANG,
               "usr-bin-python3": "#!/nowhere/python3\n"}[how]
    os.makedirs(str(tmp_path / "bin"))
    os.symlink(pyenv("3.12"), str(tmp_path / "bin" / "python3"))
    put(agent_host.root, AGENT, build("1.0.0", (SHEBANG, shebang)))
    purge_then_upgrade(author, src, shebang)
    up = run_agent(agent_host.root, "up", python=versioned_python,
                   env={"PATH": str(tmp_path / "bin") + ":/usr/bin:/bin"})
    assert up.returncode == 0, up.err
    notes = [line for line in up.err.splitlines() if "is gone from disk" in line]
    assert notes == ["isconf: warning: %s, which this agent runs under, is gone from disk; the next agent runs under "
                     "%s, %s: start isconf by its #! line, not by a versioned interpreter"
                     % (versioned_python, fallback, "the default, as the #! line of %s names none that is there"
                        % agent_host.path(AGENT) if how == "usr-bin-python3" else
                        "named by the #! line of %s" % agent_host.path(AGENT))], up.err
    assert "after transaction 1: re-executing %s under %s" % (agent_host.path(AGENT), fallback) in up.out
    assert not os.path.exists(versioned_python) and os.path.exists(agent_host.path("/tmp/after"))
    assert agent_text(agent_host) == build("1.1.0", (SHEBANG, shebang))
    log = dict((e["seq"], e["run_by"]) for e in json.loads(run_agent(agent_host.root, "log", "--json").out))
    assert log[1]["python_path"] == versioned_python
    assert log[2]["python_path"] == log[3]["python_path"] == os.path.realpath(fallback)
    assert (log[2]["agent"], log[3]["agent"]) == ("1.0.0", "1.1.0")


def test_with_no_interpreter_left_the_new_agent_is_not_installed_and_the_error_says_why(
        agent_host, versioned_python, author, src):
    # Neither #! line names one that is there, and /usr/bin/python3 is hidden from this run.
    shebang = "#!/nowhere/python3\n"
    put(agent_host.root, AGENT, build("1.0.0", (SHEBANG, shebang)))
    before = agent_text(agent_host)
    purge_then_upgrade(author, src, shebang)
    up = run_agent(agent_host.root, "up", python=versioned_python, wrap=WITHOUT_USR_BIN_PYTHON3)
    assert up.returncode == 1, up.err
    gone = ("no interpreter to run the next agent: %s, which runs this one, is gone from disk, and neither the one "
            "its #! line names nor /usr/bin/python3 is there; install one" % versioned_python)
    assert "isconf: warning: %s; carrying on in the running one" % gone in up.err  # at the hand-over
    assert error_line(up).startswith("isconf: error: transaction 2 failed: new agent %s not installed: %s; log in "
                                     % (AGENT, gone)), up.err
    assert agent_text(agent_host) == before and not glob.glob(agent_host.state("objects", "*.agent"))
    assert not os.path.exists(agent_host.path("/tmp/after"))
    assert json.loads(run_agent(agent_host.root, "status", "--json").out)["applied_seq"] == 1


def test_a_new_agent_is_self_tested_under_the_interpreter_its_own_shebang_names(
        agent_host, versioned_python, author, src):
    # The running agent's #! line names none, and /usr/bin/python3 is hidden: after the purge it carries on
    # where it is; the new agent's own #! line then names the interpreter for its self-test and the hand-over.
    put(agent_host.root, AGENT, build("1.0.0", (SHEBANG, "#!/nowhere/python3\n")))
    newer = pyenv("3.12")
    purge_then_upgrade(author, src, "#!%s\n" % newer)
    up = run_agent(agent_host.root, "up", python=versioned_python, wrap=WITHOUT_USR_BIN_PYTHON3)
    assert up.returncode == 0, up.err
    assert "no interpreter to run the next agent" in up.err and "after transaction 1" not in up.out
    assert "new agent %s passed its self-test: isconf 1.1.0 under %s" % (AGENT, newer) in up.out
    assert "after transaction 2: re-executing %s under %s" % (agent_host.path(AGENT), newer) in up.out
    assert len([line for line in up.err.splitlines() if "is gone from disk; the next agent runs under" in line]) == 1
    assert os.path.exists(agent_host.path("/tmp/after"))
    seen = run_by(agent_host)
    assert seen[2][0] == "1.0.0" and seen[3][0] == "1.1.0" and seen[3][1] == newer.split("/versions/")[1].split("/")[0]
