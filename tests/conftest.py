"""Shared test setup: no DVC analytics, a git identity for the temp repos the tests create."""
import os

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
for key, value in {"GIT_AUTHOR_NAME": "mmcn-tests", "GIT_AUTHOR_EMAIL": "tests@mmcn.invalid",
                   "GIT_COMMITTER_NAME": "mmcn-tests", "GIT_COMMITTER_EMAIL": "tests@mmcn.invalid"}.items():
    os.environ.setdefault(key, value)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (startup is about 4 s)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"DVC_NO_ANALYTICS": "1"}})
    yield ray
    ray.shutdown()
