"""A run folder is held by the process that writes it: a second one gets one line naming the holder."""

import os

import pytest

from drrl_env.lm.files import FolderInUseError, lock_folder


def test_a_locked_folder_refuses_a_second_holder_until_it_is_released(tmp_path):
    first = lock_folder(tmp_path)
    with pytest.raises(FolderInUseError, match=f"in use by process {os.getpid()}"):
        lock_folder(tmp_path)
    first.close()
    lock_folder(tmp_path).close()  # released: the next run may take it
