"""Process settings for the CPU experts (ktchat.runtime) and their huge-page buffers, checked in real processes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ktchat.experts.base import huge_page_empty
from ktchat.runtime import THP_ENABLED, huge_pages_on_request, switched_off, wanted_environment


def anon_huge_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_switches_are_on_unless_set_to_an_off_word():
    values = ("0", "false", " Off ", "NO", "1", "yes", "", "on")
    assert [switched_off("KTCHAT_X", {"KTCHAT_X": v}) for v in values] == [True] * 4 + [False] * 4
    assert switched_off("KTCHAT_X", {}) is False


def test_wanted_environment(tmp_path):
    thp = tmp_path / "enabled"
    thp.write_text("always [madvise] never\n")
    if not huge_pages_on_request(thp):
        pytest.skip("not glibc >= 2.35: no malloc.hugetlb tunable")
    assert wanted_environment({}, thp) == {"OMP_WAIT_POLICY": "PASSIVE", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert wanted_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "OMP_WAIT_POLICY": "ACTIVE"}, thp) == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
    assert wanted_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, thp) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert "GLIBC_TUNABLES" not in wanted_environment({"KTCHAT_HUGE_PAGES": "off"}, thp)
    thp.write_text("[always] madvise never\n")  # every large mapping gets them without asking
    assert "GLIBC_TUNABLES" not in wanted_environment({}, thp)
    assert "GLIBC_TUNABLES" not in wanted_environment({}, tmp_path / "no-thp-here")


# Prints the tunable it started with and how much of a fresh 64 MiB malloc landed on huge pages, then runs the
# ktchat command on a config that does not exist.
CHILD = """
import ctypes, os, sys
sys.path.insert(0, sys.argv[2])
from test_runtime import anon_huge_kib
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
before = anon_huge_kib()
libc.memset(ctypes.c_void_p(libc.malloc(64 << 20)), 1, 64 << 20)
print(f"tunables={os.environ.get('GLIBC_TUNABLES', '')} huge_kib={anon_huge_kib() - before}", flush=True)
sys.argv = ["ktchat", "chat", sys.argv[1]]
from ktchat.cli import main
sys.exit(main())
"""


@pytest.mark.parametrize("opt_out", [False, True])
def test_ktchat_command_restarts_with_huge_pages(tmp_path, opt_out):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "KTCHAT_HUGE_PAGES")}
    if opt_out:
        env["KTCHAT_HUGE_PAGES"] = "0"
    missing = tmp_path / "missing.yaml"
    result = subprocess.run([sys.executable, "-c", CHILD, str(missing), str(Path(__file__).parent)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and "config file not found" in result.stderr, result  # ran once, to the end
    starts = [dict(kv.split("=", 1) for kv in line.split()) for line in result.stdout.splitlines()]
    if opt_out or not huge_pages_on_request():
        assert [s["tunables"] for s in starts] == [""]
        return
    assert [s["tunables"] for s in starts] == ["", "glibc.malloc.hugetlb=1"]
    assert int(starts[1]["huge_kib"]) >= 32 << 10, starts  # glibc asked for huge pages, the kernel gave them


def test_huge_page_empty_is_on_huge_pages():
    thp = Path(THP_ENABLED)
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are off on this machine")
    before = anon_huge_kib()
    x = huge_page_empty((64, 1 << 19), torch.bfloat16)  # 64 MiB, as one expert projection block
    x.fill_(1.5)
    assert anon_huge_kib() - before >= 32 << 10
    assert x.shape == (64, 1 << 19) and x.dtype == torch.bfloat16 and bool((x == 1.5).all())
    assert huge_page_empty((3, 5), torch.float32).shape == (3, 5)  # small ones are plain tensors
