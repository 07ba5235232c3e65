"""Shared fixtures: the real recordings and one local Ray instance per test module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Real recordings (read-only, never copied into the repository).
REAL_DATA = Path(os.environ.get("S2V_REAL_DATA", REPO.parent / "shared" / "data" / "real"))


def pytest_collection_modifyitems(items) -> None:
    """Mark every test that reads the real recordings, so ``-m "not real_data"`` selects the rest."""
    for item in items:
        if "real_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_data)


@pytest.fixture(scope="session", autouse=True)
def private_config_home(tmp_path_factory):
    """A config directory of the test session: ingests generate their pseudonym key there, not in ~/.config."""
    with pytest.MonkeyPatch.context() as patch:
        home = tmp_path_factory.mktemp("config-home")
        patch.setenv("XDG_CONFIG_HOME", str(home))
        patch.delenv("S2V_PSEUDONYM_KEY", raising=False)
        yield home


#: A fixed pseudonym key for tests that need the same ids, hence the same splits, on every run.
TEST_PSEUDONYM_KEY = "s2v-test-pseudonym-key-0123456789abcdef"


@pytest.fixture(scope="session")
def pseudonym_key_file(tmp_path_factory) -> Path:
    """A key file with :data:`TEST_PSEUDONYM_KEY`: stores ingested with it get the same splits every run."""
    path = tmp_path_factory.mktemp("pseudonym") / "pseudonym.key"
    path.write_text(TEST_PSEUDONYM_KEY + "\n")
    return path


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real recordings not found at {REAL_DATA}; set S2V_REAL_DATA")
    return REAL_DATA


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance (2 CPUs) shared by the tests of a module, then shut down."""
    import ray

    from pipelines.runtime import start_local_ray

    if ray.is_initialized():
        ray.shutdown()
    start_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
