"""Settings from a params file into the library's config classes, checked, and the one way a
user error ends a program (stages and the ``mmcn`` CLI alike).

The stages read params.yaml (the library never does) and hand each section to
:func:`build`, which makes the config class from it: every key must be one of the class's
fields (else a did-you-mean), every value of the field's annotated type (``int`` is not
``bool``, ``"two"`` is not ``int``, a ``float`` takes an ``int``, ``X | None`` takes null),
and then the class's own ``__post_init__`` checks ranges and relations, raising
``ValueError("field: what is wrong; what to do")``. Any failure becomes a
:class:`SettingsError` naming the param: ``params.yaml: detector.batch_size: 'two' is not
an integer; set an integer (default 8)``. :func:`expect` checks a stage's own keys (a path
that must exist, a preset name) the same way.

:func:`run_main` runs a program's main: a user error (a bad setting, a bad input file, a
refused checkpoint: :data:`USER_ERRORS`) is printed as one line on stderr and exits 2, no
traceback; ``MMCN_DEBUG=1`` (the CLI: ``--debug``) prints the traceback as well.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
import sys
import traceback
import types
from pathlib import Path
from typing import Any, Callable, Literal, Union, get_args, get_origin, get_type_hints

PARAMS = "params.yaml"
DEBUG_ENV = "MMCN_DEBUG"
# the library's errors about what the user gave it: every mmcn *Error about a setting, a file or a
# checkpoint is a ValueError (LmdbBuildError, CheckpointError, OscarCheckpointError, EvalFileError,
# UnknownLabelError, ...); missing inputs are FileNotFoundError / NotADirectoryError
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
_MISSING = dataclasses.MISSING


class SettingsError(ValueError):
    """A bad setting; the message names it (``params.yaml: section.key: ...; ...``)."""


def _fields(config_class) -> dict[str, tuple[Any, Any]]:
    """``name -> (annotation, default)`` of a dataclass, or of the annotated ``__init__``
    parameters of a class and of its mmcn base classes (a transformers config such as
    :class:`mmcn.models.regions.caption.CaptionConfig`, whose ``**kwargs`` go to BERT's)."""
    passes_on = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(config_class.__init__).parameters.values())
    if dataclasses.is_dataclass(config_class) and not passes_on:
        hints = get_type_hints(config_class)
        return {f.name: (hints[f.name], f.default) for f in dataclasses.fields(config_class) if f.init}
    found = {}
    for klass in config_class.__mro__:
        if klass.__module__.startswith("mmcn.") and "__init__" in vars(klass):
            hints = get_type_hints(klass.__init__)
            for name, param in inspect.signature(klass.__init__).parameters.items():
                if name != "self" and param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                    found.setdefault(name, (hints.get(name, Any), param.default))
    return found


def _matches(value: Any, annotation: Any) -> bool:
    origin = get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in get_args(annotation))
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (tuple, list):
        return isinstance(value, (tuple, list))
    if isinstance(origin or annotation, type):
        return isinstance(value, origin or annotation)
    return True


def _describe(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(annotation))
    if origin is Literal:
        return "one of " + ", ".join(map(str, get_args(annotation)))
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string",
             dict: "a mapping", list: "a list", tuple: "a list"}
    return names.get(origin or annotation, getattr(annotation, "__name__", str(annotation)))


def _unknown(where: str, section: str, key: str, known: list[str]) -> SettingsError:
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"did you mean {section}.{close[0]}?" if close else f"remove it (known: {', '.join(sorted(known))})"
    return SettingsError(f"{where}: {section}.{key}: unknown setting; {hint}")


def build(config_class, *sections: tuple[str, Any], own: tuple[str, ...] = (), where: str = PARAMS):
    """``config_class`` made from the params ``sections``, pairs ``(dotted name, mapping)`` such
    as ``("caption.train", {...}), ("execution.train", {...})``: one config from several
    sections, each key named with the section it came from. Keys in ``own`` are the stage's
    own (checked with :func:`expect`): left out here. Raises :class:`SettingsError`."""
    fields = _fields(config_class)
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for section, given in sections:
        if given is None:
            given = {}
        if not isinstance(given, dict):
            raise SettingsError(f"{where}: {section}: expected a mapping of settings, got {given!r}; "
                                f"indent its keys under {section.split('.')[-1]}:")
        for key, value in given.items():
            if key in own:
                continue
            if key not in fields:
                raise _unknown(where, section, key, [*fields, *own])
            if key in origin:
                raise SettingsError(f"{where}: {section}.{key}: also set as {origin[key]}.{key}; keep one")
            annotation, default = fields[key]
            if not _matches(value, annotation):
                example = "" if default is _MISSING or default is inspect.Parameter.empty else \
                    f" (default {'null' if default is None else default!r})"
                raise SettingsError(f"{where}: {section}.{key}: {value!r} is not {_describe(annotation)}; "
                                    f"set {_describe(annotation)}{example}")
            values[key], origin[key] = value, section
    try:
        return config_class(**values)
    except (ValueError, TypeError) as e:
        message = str(e)
        name = re.match(r"\w+", message)
        name = name[0] if name else ""
        if name in fields:  # "field: ...": name the param where it was set (or the first section)
            return _raise(f"{where}: {origin.get(name, sections[0][0] if sections else '')}.{message}")
        return _raise(f"{where}: {sections[0][0] if sections else config_class.__name__}: {message}")


def _raise(message: str):
    raise SettingsError(message) from None


def expect(values: dict, section: str, key: str, kind: type | tuple[type, ...] = str, *, choices=(),
           path: Literal["file", "dir", "any"] | None = None, optional: bool = False, where: str = PARAMS) -> Any:
    """Check a stage's own key ``values[key]`` (one no config class has) and return it: of
    ``kind`` (null or empty allowed when ``optional``: None), one of ``choices``, or an existing ``path``
    (``file``, ``dir`` or ``any``; relative to the working folder). Raises :class:`SettingsError`."""
    name = f"{where}: {section}.{key}"
    if key not in values:
        raise SettingsError(f"{name}: missing; set it (see README, params.yaml)")
    value = values[key]
    if optional and value in (None, ""):
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        wanted = " or ".join(_describe(k) for k in kinds)
        raise SettingsError(f"{name}: {value!r} is not {wanted}; set {wanted}")
    if choices and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise SettingsError(f"{name}: {value!r} is not a choice; {hint}choose one of {', '.join(map(str, choices))}")
    if path:
        found = Path(value)
        ok = {"file": found.is_file, "dir": found.is_dir, "any": found.exists}[path]()
        if not ok:
            what = {"file": "file", "dir": "folder", "any": "file or folder"}[path]
            raise SettingsError(f"{name}: {value}: no such {what}; create it or point {section}.{key} elsewhere")
    return value


def one_line(error: BaseException) -> str:
    """An error's message on one line (its lines joined)."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_main(main: Callable[[], int | None], user_errors: tuple[type[BaseException], ...] = (),
             debug: bool = False) -> int:
    """``main()``'s exit code (None: 0); a user error (:data:`USER_ERRORS` + ``user_errors``) is
    printed as ``error: <message>`` on one line of stderr and returns 2, with its traceback
    before it when ``debug`` or ``MMCN_DEBUG`` is set. Any other exception (a bug) propagates."""
    try:
        return main() or 0
    except (*USER_ERRORS, *user_errors) as e:
        if debug or debugging():
            traceback.print_exc()
        sys.stdout.flush()
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
