"""Model-based test: the mirrored `disk` behaves exactly like a plain file of
fixed size, and every member holds exactly what the mount shows.

Hypothesis drives the mount and a plain reference file with the same random
sequences of writes (including ones that cross or start past the end),
reads (some after dropping the page cache, so they reach the members),
fsyncs and remounts, and requires the same data and the same errors. At the
end of every example the members' data regions, read directly from the
image files, must equal the reference.
"""

from __future__ import annotations

import errno
import os

import pytest
from conftest import Cleanup, Env, data_region_hash, raid1fs, sha256
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

SIZE = 8 << 20


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    cleanup = Cleanup()
    e = Env(tmp_path_factory.mktemp("model"), cleanup)
    members, mnt = e.volume(size="8M")
    ref = e.path("reference")
    with open(ref, "wb") as f:
        f.truncate(SIZE)
    try:
        yield members, mnt, ref
    finally:
        assert not cleanup.run()


offsets = st.one_of(st.integers(0, SIZE - 1), st.integers(SIZE - 8192, SIZE + 4096),
                    st.integers(0, SIZE // 4096 - 1).map(lambda b: b * 4096))
lengths = st.one_of(st.integers(1, 4096), st.sampled_from([4096, 65536, 131072, 1 << 20]),
                    st.integers(1, 300_000))


def test_disk_matches_plain_file(volume):
    members, mnt, ref = volume

    class DiskModel(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.disk = os.open(mnt / "disk", os.O_RDWR)
            self.ref = os.open(ref, os.O_RDWR)
            self.mounted = True

        def teardown(self) -> None:
            os.fsync(self.disk)
            os.close(self.disk)
            os.close(self.ref)
            want = sha256(ref)
            assert sha256(mnt / "disk") == want
            for m in members:
                assert data_region_hash(m) == want, f"{m} differs from the reference"

        @rule(off=offsets, n=lengths, seed=st.binary(min_size=1, max_size=16))
        def write(self, off, n, seed):
            data = (seed * (n // len(seed) + 1))[:n]
            if off >= SIZE:
                with pytest.raises(OSError) as e:
                    os.pwrite(self.disk, data, off)
                assert e.value.errno in (errno.ENOSPC, errno.EFBIG)
                return
            expect = min(n, SIZE - off)
            assert os.pwrite(self.disk, data, off) == expect
            os.pwrite(self.ref, data[:expect], off)

        @rule(off=offsets, n=lengths)
        def read(self, off, n):
            assert os.pread(self.disk, n, off) == os.pread(self.ref, n, off)

        @rule(off=offsets, n=lengths)
        def read_uncached(self, off, n):
            os.posix_fadvise(self.disk, 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.pread(self.disk, n, off) == os.pread(self.ref, n, off)

        @rule()
        def fsync(self):
            os.fsync(self.disk)

        @precondition(lambda self: True)
        @rule()
        def remount(self):
            os.close(self.disk)
            raid1fs("umount", mnt)
            raid1fs("mount", *members, mnt)
            self.disk = os.open(mnt / "disk", os.O_RDWR)

        @invariant()
        def size_is_fixed(self):
            assert os.fstat(self.disk).st_size == SIZE

    DiskModel.TestCase.settings = settings(
        max_examples=15, stateful_step_count=20, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    DiskModel.TestCase().runTest()
