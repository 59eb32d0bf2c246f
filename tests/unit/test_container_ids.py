"""Ids become file names and runc arguments: anything that could escape or confuse them is refused."""

import pytest

from shim.container import check_id
from shim.ttrpc import Code, TTRPCError


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".", "..", ".hidden", "x\x00y", "abc\n", "z" * 129, "é"])
def test_bad_ids_are_invalid_argument(bad):
    with pytest.raises(TTRPCError) as e:
        check_id("container id", bad)
    assert e.value.code == Code.INVALID_ARGUMENT


@pytest.mark.parametrize("good", ["c1", "a" * 128, "f9e3c0a1-b2", "web_1.2"])
def test_good_ids_pass(good):
    check_id("exec id", good)
