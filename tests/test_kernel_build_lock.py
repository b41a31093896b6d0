"""A kernel build killed halfway leaves torch's lock file: later builds must not wait forever."""

import os
import time

import pytest

from paligemma import kernels


def test_a_lock_left_by_a_killed_build_is_removed_with_a_warning(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    hour_ago = time.time() - 3600
    os.utime(lock, (hour_ago, hour_ago))
    with pytest.warns(UserWarning, match="left 60 minutes ago by a kernel build that did not"):
        kernels._clear_stale_lock(tmp_path)
    assert not lock.exists()


def test_a_fresh_lock_is_another_build_and_stays(tmp_path, recwarn):
    (tmp_path / "lock").touch()
    kernels._clear_stale_lock(tmp_path)
    assert (tmp_path / "lock").exists() and not recwarn.list


def test_no_lock_no_warning(tmp_path, recwarn):
    kernels._clear_stale_lock(tmp_path)
    assert not recwarn.list
