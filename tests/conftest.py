"""Shared test setup: no DVC analytics, a git identity for the temp repos the tests create."""
import os

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
for key, value in {"GIT_AUTHOR_NAME": "mmcn-tests", "GIT_AUTHOR_EMAIL": "tests@mmcn.invalid",
                   "GIT_COMMITTER_NAME": "mmcn-tests", "GIT_COMMITTER_EMAIL": "tests@mmcn.invalid"}.items():
    os.environ.setdefault(key, value)
