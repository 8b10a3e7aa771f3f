"""The shape of isconf.py, read from its syntax tree (STYLE.md): one home for each concept and each
hazard, and a file that reads in one direction.  Each check names what it found where."""

import ast
import collections

import pytest

from conftest import ISCONF


@pytest.fixture(scope="module")
def tree():
    with open(ISCONF) as f:
        return ast.parse(f.read())


def enclosing(tree):
    """node -> the chain of (top-level and nested) definitions around it, outermost first."""
    chains = {}

    def visit(node, chain):
        for child in ast.iter_child_nodes(node):
            inner = chain + [child] if isinstance(child, (ast.FunctionDef, ast.ClassDef)) else chain
            chains[child] = inner
            visit(child, inner)
    visit(tree, [])
    return chains


def classes(tree):
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def subclasses_of(tree, roots):
    """The names of the top-level classes that derive, directly or not, from one of roots."""
    found, bases = set(roots), {c.name: [b.id for b in c.bases if isinstance(b, ast.Name)]
                                for c in classes(tree).values()}
    while True:
        more = {name for name, parents in bases.items() if set(parents) & found} - found
        if not more:
            return found
        found |= more


def where(chains, node):
    return ".".join(getattr(d, "name", "?") for d in chains.get(node, [])) or "module level"


def test_rename_is_called_from_one_function_only(tree):
    # One durable replace, one rename: the temp-then-rename hazard handled once (ENOSPC, EISDIR, aliases).
    chains, callers = enclosing(tree), set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in
                ("rename", "replace") and isinstance(node.func.value, ast.Name) and node.func.value.id == "os"):
            callers.add(where(chains, node))
    assert callers == {"rename_into_place"}, sorted(callers)


def test_only_the_reporter_writes_to_stdout_or_stderr_and_nothing_prints(tree):
    chains, found = enclosing(tree), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            found.append("print() in " + where(chains, node))
        if (isinstance(node, ast.Attribute) and node.attr in ("stdout", "stderr")
                and isinstance(node.value, ast.Name) and node.value.id == "sys"):
            chain = chains.get(node, [])
            in_reporter = chain and isinstance(chain[0], ast.ClassDef) and chain[0].name == "Reporter"
            in_version_guard = not chain and node.lineno < 30  # before anything an old interpreter cannot parse
            if not (in_reporter or in_version_guard):
                found.append("sys.%s in %s (line %d)" % (node.attr, where(chains, node), node.lineno))
    assert not found, found


def test_entry_fields_are_read_only_by_entry_and_the_kind_and_file_type_classes(tree):
    owners = subclasses_of(tree, {"Kind", "FileType"}) | {"Entry", "Head"}
    chains, found = enclosing(tree), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "fields":
            chain = chains.get(node, [])
            if not (chain and isinstance(chain[0], ast.ClassDef) and chain[0].name in owners):
                found.append("%s (line %d)" % (where(chains, node), node.lineno))
    assert not found, found


def test_kind_and_file_type_fields_are_named_only_inside_their_classes(isconf, tree):
    # A field only one kind or file type has (argv, files, object, extents, target...) is spelled nowhere
    # else: what a kind means cannot leak into the applier, status or the author's side.
    shared = set(isconf.ENTRY_FIELDS) | set(isconf.HEAD_FIELDS) | set(isconf.OWNER_FIELDS) | {
        "path", "type", "mode", "size", "mtime_ns"}
    own = set()
    for table in (isconf.KINDS, isconf.FILE_TYPES):
        for row in table.values():
            own |= set(row.fields) | set(getattr(row, "optional", ()))
    own -= shared
    assert {"argv", "cwd", "files", "object", "extents", "target"} <= own
    owners = subclasses_of(tree, {"Kind", "FileType"})
    chains, found = enclosing(tree), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript):
            key = node.slice.value if isinstance(node.slice, ast.Index) else node.slice  # 3.8 wraps it
            if isinstance(key, ast.Constant) and key.value in own:
                chain = chains.get(node, [])
                if not (chain and isinstance(chain[0], ast.ClassDef) and chain[0].name in owners):
                    found.append("[%r] in %s (line %d)" % (key.value, where(chains, node), node.lineno))
    assert not found, found


def test_nothing_outside_the_kind_classes_branches_on_an_entry_kind(tree):
    owners = subclasses_of(tree, {"Kind"}) | {"Entry"}
    chains, found = enclosing(tree), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in [node.left] + node.comparators:
                if isinstance(side, ast.Attribute) and side.attr in ("kind", "reboots"):
                    chain = chains.get(node, [])
                    if not (chain and isinstance(chain[0], ast.ClassDef) and chain[0].name in owners):
                        found.append("%s (line %d)" % (where(chains, node), node.lineno))
        if isinstance(node, ast.Attribute) and node.attr == "reboots":
            found.append("a .reboots flag at line %d" % node.lineno)
    assert not found, found


def test_every_definition_uses_only_what_is_defined_above_it(tree):
    # The file reads downwards: a definition calls what came before it, never what comes after
    # (main's dispatch, at the bottom, is the one place that reaches everything).
    defined = collections.OrderedDict()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.setdefault(node.name, node.lineno)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        defined.setdefault(name.id, node.lineno)
    found = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name == "main":
            continue
        local = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        local |= {a.arg for n in ast.walk(node) if isinstance(n, ast.arguments)
                  for a in n.args + n.kwonlyargs + [x for x in (n.vararg, n.kwarg) if x]}
        for name in ast.walk(node):
            if (isinstance(name, ast.Name) and isinstance(name.ctx, ast.Load) and name.id not in local
                    and defined.get(name.id, 0) > node.lineno):
                found.append("%s (line %d) uses %s, defined at line %d"
                             % (node.name, node.lineno, name.id, defined[name.id]))
    assert not found, found
