"""Freed host memory is kept on the heap inside a run and handed back after it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from saliencycheck.engine.host_memory import available

pytestmark = pytest.mark.skipif(not available(), reason="tunes glibc's allocator only")

# In a fresh process, so the allocator starts from glibc's defaults. A 48 MiB block is above
# glibc's largest mmap threshold (32 MiB): by default it is a mapping of its own, unmapped on
# free; while reused_host_memory is active it comes from the heap and stays there when freed.
SCRIPT = """
import json, torch
from saliencycheck.engine.host_memory import reused_host_memory

def heap():
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            return [int(a, 16) for a in line.split()[0].split("-")]

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

def block_on_heap():
    block = torch.ones(48 * 2**20 // 4)
    start, end = heap()
    return start <= block.data_ptr() < end

out = {"before": block_on_heap()}
with reused_host_memory() as active:
    with reused_host_memory() as nested:
        pass
    out.update(active=active, nested=nested, inside=block_on_heap())
    blocks = [torch.ones(48 * 2**20 // 4) for _ in range(4)]
    del blocks
    out["kept_mib"] = rss_mib()
out["returned_mib"] = rss_mib()
with reused_host_memory(enabled=False) as disabled:
    out["disabled"] = disabled
print(json.dumps(out))
"""


def test_freed_blocks_stay_on_the_heap_inside_and_are_returned_after() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          check=True)
    out = json.loads(done.stdout)
    assert out["active"] and out["nested"] and not out["disabled"]
    assert not out["before"]  # by default a block of its own, unmapped when freed
    assert out["inside"]  # from the heap while active, even after an inner exit
    assert out["kept_mib"] - out["returned_mib"] > 3 * 48  # handed back on the last exit
