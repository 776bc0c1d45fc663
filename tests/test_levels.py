"""The `unit` marker means what tests/README.md says: a unit test that trains or starts a process
fails (the guard is in conftest.py), and an unmarked test may do both."""

import subprocess
import sys

import pytest
import torch

from tests.conftest import _NotAUnitTest


@pytest.mark.unit
def test_a_unit_test_cannot_train():
    x = torch.ones(2, requires_grad=True)
    with pytest.raises(_NotAUnitTest, match="backward pass"):
        (x * 2).sum().backward()
    with pytest.raises(_NotAUnitTest, match="backward pass"):
        torch.autograd.backward((x * 3).sum())


@pytest.mark.unit
def test_a_unit_test_cannot_start_a_process():
    with pytest.raises(_NotAUnitTest, match="started a process"):
        subprocess.run([sys.executable, "-c", "pass"])


@pytest.mark.process
def test_an_unmarked_test_may_do_both():
    x = torch.ones(2, requires_grad=True)
    (x * 2).sum().backward()
    assert x.grad.tolist() == [2.0, 2.0]
    assert subprocess.run([sys.executable, "-c", "pass"]).returncode == 0


@pytest.fixture(scope="module")
def trains_in_setup():
    """A module fixture that trains, as a shared trained run does."""
    x = torch.ones(2, requires_grad=True)
    try:
        (x * 2).sum().backward()
    except _NotAUnitTest:
        return "refused"
    return "trained"


@pytest.mark.unit
def test_a_unit_tests_fixtures_cannot_train_either(trains_in_setup):
    assert trains_in_setup == "refused"
