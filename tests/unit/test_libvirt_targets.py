"""--disk all makes a directory per disk target under --state and --mount: only plain names may become one."""

import pytest

from tap.job import AttachError
from tap.libvirt_job import check_targets


def test_plain_targets_pass():
    assert check_targets("vm1", ["vda", "sdb", "hd_c-1"]) == ["vda", "sdb", "hd_c-1"]


@pytest.mark.parametrize("target", ["..", "../etc", "a/b", "", ".", "x" * 65, "vd a", "vda\n"])
def test_a_target_that_is_not_a_plain_name_is_refused(target):
    with pytest.raises(AttachError, match="cannot name a directory"):
        check_targets("vm1", ["vda", target])
