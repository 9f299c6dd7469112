"""configure_torch_threads: the thread count the tools run with."""
import os

import pytest
import torch

from d2_reclass.threads import configure_torch_threads


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch):
    # configure_torch_threads writes os.environ itself; setenv makes monkeypatch restore it.
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", ""))
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_one_thread_unless_told_and_exported_to_child_processes(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert configure_torch_threads() == 1
    assert torch.get_num_threads() == 1
    assert os.environ["OMP_NUM_THREADS"] == "1"


def test_explicit_omp_num_threads_is_applied_even_above_the_core_count(monkeypatch):
    count = (os.cpu_count() or 1) + 1  # torch alone would cap this at the core count
    monkeypatch.setenv("OMP_NUM_THREADS", str(count))
    assert configure_torch_threads() == count
    assert torch.get_num_threads() == count


@pytest.mark.parametrize("value", ["0", "two", "4,2"])
def test_a_value_that_is_not_a_positive_integer_is_refused(monkeypatch, value):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    with pytest.raises(ValueError, match=f"OMP_NUM_THREADS='{value}': expected a positive"):
        configure_torch_threads()
