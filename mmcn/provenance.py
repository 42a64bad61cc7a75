"""Provenance: which mmcn files a piece of code runs (its transitive imports and the package
data they declare), and content checksums of files. The one source of truth for the code
deps of dvc.yaml (checked by tests/test_deps.py) and for the resume fingerprints (feature
extraction, the Ray Train run name), so the two cannot drift apart.

Package data convention: a module that opens files under ``mmcn/resources/`` names them in a
module-level ``RESOURCES`` tuple of paths relative to the package (string literals, or names
of module-level string constants; a directory stands for every file in it), e.g.
``RESOURCES = ("resources/labels_zh.tsv",)``.
"""
from __future__ import annotations

import ast
import mmap
import os
from pathlib import Path

import xxhash

PACKAGE = "mmcn"
PACKAGE_DIR = Path(__file__).resolve().parent
DECLARATION = "RESOURCES"  # the module-level constant that declares a module's package data


def code_files(target: str | os.PathLike) -> list[Path]:
    """Every file (absolute, sorted) whose content decides what running or importing
    ``target`` does, as far as mmcn goes: ``target`` itself, the mmcn modules it imports
    transitively, and the package data those modules declare in ``RESOURCES``.

    ``target`` is a dotted mmcn module name (``"mmcn.train.loop"``) or a Python file. Every
    ``import`` / ``from … import`` anywhere in a file counts (inside functions too, relative
    ones too, except under ``if TYPE_CHECKING:``), with the ``__init__.py`` of each package on
    the way (Python runs them on import) and ``from pkg import name`` where ``name`` is a
    submodule. A file outside the package also brings in the files next to it that it imports
    by their top-level name, as ``python stages/x.py`` finds ``stages/common.py``. Modules
    outside mmcn (the standard library, third parties) are not followed.

    Raises ``ImportError`` naming the file and line of an import of an mmcn module that does
    not exist, and ``ValueError`` for a ``RESOURCES`` entry that is not a path under the
    package given as a literal (or a module-level string constant).
    """
    if isinstance(target, str) and not target.endswith(".py"):
        todo = _module_chain(target)
        if not todo or todo[-1] != _module_path(target):
            raise ImportError(f"{target}: no such module in {PACKAGE_DIR}")
    else:
        todo = [Path(target).resolve()]
    files: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in files:
            continue
        files.add(path)
        tree = ast.parse(path.read_bytes(), filename=str(path))
        files.update(_declared_resources(path, tree))
        todo.extend(_imported_files(path, tree))
    return sorted(files)


def digests(files: list[Path]) -> dict[str, str]:
    """``{name: XXH3-128 hex}`` of files (a directory: of all its files, names included), the
    name relative to the folder that holds the package (``mmcn/data/tsv.py``) when it is
    inside it: a fingerprint of code that does not depend on where mmcn is installed."""
    out = {}
    for path in files:
        path = Path(path).resolve()
        try:
            name = path.relative_to(PACKAGE_DIR.parent).as_posix()
        except ValueError:
            name = path.as_posix()
        if path.is_dir():
            h = xxhash.xxh3_128()
            for member in sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
                h.update(member.relative_to(path).as_posix().encode() + b"\0")
                h.update(checksum(member)["xxh3_128"].encode())
            out[name] = h.hexdigest()
        else:
            out[name] = checksum(path)["xxh3_128"]
    return out


def checksum(source: Path | memoryview) -> dict:
    """XXH3-128 and size of a file (or of its memory map, already paged in): enough to tell
    which inputs something was made from, and at 10+ GB/s it hides behind the work (a
    cryptographic hash would be the slowest part of an LMDB build; dvc.lock keeps the md5 of
    every input folder anyway)."""
    if isinstance(source, memoryview):
        return {"xxh3_128": xxhash.xxh3_128_hexdigest(source), "bytes": source.nbytes}
    with open(source, "rb") as f:
        if not os.fstat(f.fileno()).st_size:
            return checksum(memoryview(b""))
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm, memoryview(mm) as view:
            return checksum(view)


# --------------------------------------------------------------------------- the walk

def _module_path(name: str) -> Path | None:
    """The file of mmcn module ``name`` (a package: its ``__init__.py``), or None."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for path in (base / "__init__.py", base.with_name(base.name + ".py") if len(parts) > 1 else None):
        if path is not None and path.is_file():
            return path
    return None


def _module_chain(name: str) -> list[Path]:
    """The files that ``import name`` runs: each package's ``__init__.py`` on the way, then the
    module; it stops at the first part that is not a module (``from a.b import attr``)."""
    parts, chain = name.split("."), []
    for k in range(1, len(parts) + 1):
        path = _module_path(".".join(parts[:k]))
        if path is None:
            break
        chain.append(path)
        if path.name != "__init__.py":
            break
    return chain


def _module_name(path: Path) -> str | None:
    """The dotted name of a file inside the package, or None."""
    if PACKAGE_DIR not in path.parents:
        return None
    rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(node: ast.AST):
    """Every Import / ImportFrom node under ``node``, leaving out ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            for other in child.orelse:
                yield from _imports(ast.Module(body=[other], type_ignores=[]))
        else:
            yield from _imports(child)


def _imported_files(path: Path, tree: ast.Module) -> list[Path]:
    own = _module_name(path)
    found = []

    def need(name: str, node: ast.AST) -> list[Path]:
        chain = _module_chain(name)
        if not chain or _module_name(chain[-1]) != name:
            raise ImportError(f"{path}:{node.lineno}: imports {name}, which is not a module in {PACKAGE_DIR}")
        return chain

    for node in _imports(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    found += need(alias.name, node)
                elif own is None and "." not in alias.name:
                    found += _sibling(path, alias.name)
            continue
        if node.level:  # relative: from the package of this module
            if own is None:
                continue
            package = own.split(".") if path.name == "__init__.py" else own.split(".")[:-1]
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
        elif node.module and node.module.split(".")[0] == PACKAGE:
            base = node.module
        else:
            if own is None and node.module and "." not in node.module:
                found += _sibling(path, node.module)
            continue
        found += need(base, node)
        for alias in node.names:
            sub = _module_path(f"{base}.{alias.name}") if alias.name != "*" else None
            if sub is not None:
                found.append(sub)
    return found


def _sibling(path: Path, name: str) -> list[Path]:
    """A script's import of a module next to it (``from common import …`` in stages/)."""
    for candidate in (path.parent / f"{name}.py", path.parent / name / "__init__.py"):
        if candidate.is_file():
            return [candidate.resolve()]
    return []


def _declared_resources(path: Path, tree: ast.Module) -> list[Path]:
    """The package data a module declares in its module-level ``RESOURCES``: a tuple of string
    literals or names of module-level string constants."""
    constants, out = {}, []
    for node in tree.body:
        if not isinstance(node, (ast.Assign, ast.AnnAssign)) or node.value is None:
            continue
        names = [t.id for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                 if isinstance(t, ast.Name)]
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            constants.update(dict.fromkeys(names, node.value.value))
        if DECLARATION not in names:
            continue
        elements = node.value.elts if isinstance(node.value, (ast.Tuple, ast.List)) else [None]
        for element in elements:
            if isinstance(element, ast.Constant) and isinstance(element.value, str):
                entry = element.value
            elif isinstance(element, ast.Name) and element.id in constants:
                entry = constants[element.id]
            else:
                raise ValueError(f"{path}:{node.lineno}: {DECLARATION} must be a tuple of string literals or of "
                                 f"names of module-level string constants")
            resource = (PACKAGE_DIR / entry).resolve()
            if not resource.exists() or PACKAGE_DIR not in resource.parents:
                raise ValueError(f"{path}:{node.lineno}: {DECLARATION} entry {entry!r} is not a file or folder "
                                 f"under {PACKAGE_DIR}")
            out.append(resource)
    return out
