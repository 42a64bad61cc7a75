"""How the builders replace their output folders and recognise the leftovers of killed runs
(one home for ingest, the feature shards, the LMDB store and the feature import)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (outside POSIX: assumed so, never checked).
    A temp file or folder named after a dead writer's pid is a leftover; a live one's is not."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def replace_folder(out: Path, new: Path) -> None:
    """Put folder ``new`` at ``out``: the old ``out`` renamed aside (under ``new``'s temp name,
    so a kill here leaves only a temp folder), ``new`` renamed in, then the old one deleted."""
    out, new = Path(out), Path(new)
    old = new.with_name(new.name + "-old")
    had_old = os.path.lexists(out)
    if had_old:
        os.replace(out, old)
    os.replace(new, out)
    if had_old:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
