"""Fixtures shared by unit tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run torch on one thread: on this small shared machine, torch's tiny test ops mostly wait on
    each other with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_cache_dir(tmp_path_factory) -> str:
    """One tokenized-corpus cache for the whole session: the second build with the same settings is a hit."""
    return str(tmp_path_factory.getbasetemp() / "moe-data-cache")
