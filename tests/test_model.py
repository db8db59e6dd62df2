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
import functools
import json
import os
import random
import string
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import (
    Cleanup,
    Env,
    _unmount_raid1fs,
    data_region_hash,
    drop_cache,
    faultfs,
    one_line,
    raid1fs,
    sha256,
    status_json,
)
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from raid1fs import control
from raid1fs.status import offline_status

SIZE = 8 << 20



def write_both(disk: int, ref: int, size: int, off: int, n: int, seed: bytes) -> None:
    """The same write to the disk and to the reference file: past the end of
    the disk it must fail (the disk cannot grow), across it be cut short."""
    data = (seed * (n // len(seed) + 1))[:n]
    if off >= size:
        with pytest.raises(OSError) as e:
            os.pwrite(disk, data, off)
        assert e.value.errno in (errno.ENOSPC, errno.EFBIG)
        return
    expect = min(n, size - off)
    assert os.pwrite(disk, data, off) == expect
    os.pwrite(ref, data[:expect], off)


def first_difference(got: bytes, want: bytes) -> int:
    return next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                min(len(got), len(want)))

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
            write_both(self.disk, self.ref, SIZE, off, n, seed)

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


# ----- the same, while the volume's members change ----------------------------------

CHURN_SIZE = 32 << 20
# Rebuild rates a mount gets. A full rebuild copies the volume in 8 MiB chunks:
# at 4M each takes 2 s, so a new member holds part of the volume for seconds,
# over many steps; a resync copies 1 MiB regions (0.25 s each). At 64M a
# rebuild ends within a step or two. `rebuild --max-rate 0` lifts the limit.
RATES = ["4M", "16M", "64M"]
MAX_MEMBERS = 7  # members listed by status, spares and failed ones included

# How a member's state may change between two looks at `status` without a
# command in between: a rebuild finishes; a spare takes over.
DRIFT = {"online": {"online"}, "rebuilding": {"rebuilding", "online"},
         "spare": {"spare", "rebuilding", "online"}, "failed": {"failed"}, "stale": {"stale"}}
SYNCING = {"rebuilding", "online"}

churn_offsets = st.one_of(st.integers(0, CHURN_SIZE - 1),
                          st.integers(CHURN_SIZE - 8192, CHURN_SIZE + 4096),
                          st.integers(0, CHURN_SIZE // 4096 - 1).map(lambda b: b * 4096))
# A few I/O operations, run after every step: so every member change is
# followed at once by I/O, while the rebuild it started runs.
# Uncached reads, of a range or of the whole disk, are what catch a member
# serving what it does not hold.
io_ops = st.lists(st.one_of(
    st.tuples(st.just("write"), churn_offsets, lengths, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("read"), churn_offsets, lengths),
    st.tuples(st.just("read_uncached"), churn_offsets, lengths),
    st.tuples(st.just("read_uncached"), churn_offsets, lengths),
    st.tuples(st.just("verify")),
    st.tuples(st.just("fsync"))), max_size=4)
picks = st.integers(0, 7)  # which of the candidates a rule takes (modulo their number)


def step(f):
    """A rule or invariant: the machine counts as broken until it completes,
    so that teardown after a failed step only cleans up, and the failure
    hypothesis reports is the step's, not a follow-on one in teardown."""
    @functools.wraps(f)
    def run_step(self, *args, **kw):
        self.broken = True
        f(self, *args, **kw)
        self.broken = False
    return run_step


@pytest.fixture
def churn(tmp_path):
    cleanup = Cleanup()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cleanup.push(_unmount_raid1fs, str(mnt))  # whatever a failed example left mounted
    try:
        yield tmp_path, mnt
    finally:
        assert not cleanup.run()


def test_disk_matches_plain_file_while_members_change(churn):
    """The `disk` of a 3-member volume equals a plain file under random writes,
    reads (cached, and uncached so they reach the members), fsyncs and
    remounts, while members are failed, re-added, replaced, removed, added
    (also as spares) and rebuilt, with rebuilds running under a rate limit
    across the following steps.

    The model tracks what each member must be from the commands' results and
    `status`: after a command only its stated outcome is accepted; between
    commands only a rebuild finishing or a spare taking over; and volume.state
    must follow from the members' states. An uncached read that a rebuilding
    member serves from a region it does not hold yet (a new member holds
    zeros there, a returning one old data) differs from the reference. At the
    end every rebuild is completed, failed members re-added, and every in-sync
    member's data region, read from its image file, must equal the reference,
    and the offline status of the members must say clean.

    Between commands the model asks the mount's control socket for the report
    `raid1fs status --json MNT` prints (a process per look would cost more
    than the steps themselves); teardown and `rebuild --wait` ask the CLI.
    """
    tmp, mnt = churn
    counter = iter(range(1 << 30))

    class ChurnModel(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.broken = True
            self.disk = -1
            self.dir = tmp / f"ex{next(counter)}"
            self.dir.mkdir()
            self.names = iter(string.ascii_lowercase)
            first = [self.fresh() for _ in range(3)]
            raid1fs("create", "--kind", "disk", "--size", "32M", *first)
            self.state = dict.fromkeys(first, "online")  # path -> state in the last status
            self.brought: set[str] = set()  # open in the mount: given to it, or added
            self.replacing: dict[str, str] = {}  # NEW -> OLD of a running replace
            self.unused: list[str] = []  # images of removed members
            self.widths = {3}  # what members_expected may be now
            self.ref_path = self.dir / "reference"
            with open(self.ref_path, "wb") as f:
                f.truncate(CHURN_SIZE)
            self.ref = os.open(self.ref_path, os.O_RDWR)
            self.mount(first, "4M")
            # Data everywhere, so that a member without it (a new one reads
            # as zeros) differs wherever it is read.
            fill = random.Random(self.dir.name).randbytes(CHURN_SIZE)
            os.pwrite(self.disk, fill, 0)
            os.pwrite(self.ref, fill, 0)
            self.check({})
            self.broken = False

        # ----- helpers ------------------------------------------------------

        def fresh(self) -> str:
            return str(self.dir / f"{next(self.names)}.img")

        def mount(self, members: list[str], rate: str) -> None:
            raid1fs("mount", "--max-rebuild-rate", rate, *members, mnt)
            self.rate: str | None = rate
            self.brought = set(members)
            self.disk = os.open(mnt / "disk", os.O_RDWR)

        def cli(self, *args, ok: bool = True, name: str | None = None):
            r = raid1fs(*args, check=False)
            cmd = "raid1fs " + " ".join(map(str, args))
            if ok:
                assert r.returncode == 0, f"{cmd} exited {r.returncode}: {r.stderr}"
            else:
                assert r.returncode != 0, f"{cmd} should have been refused:\n{r.stdout}"
                line = one_line(r.stderr)
                assert name is None or name in line, line
            return r

        def having(self, *states: str) -> list[str]:
            return sorted(p for p, s in self.state.items() if s in states)

        def leaving(self) -> set[str]:
            """The OLD of a finished replace, about to be dropped: no rule picks it."""
            return {old for new, old in self.replacing.items() if self.state.get(new) == "online"}

        def filled(self) -> int:
            return len(self.having("online", "rebuilding"))

        def status(self, cli: bool = False) -> dict:
            if not cli:
                return control.request(str(mnt), "status", timeout=30)
            r = raid1fs("status", "--json", mnt, check=False)
            st = json.loads(r.stdout)
            assert r.returncode == (0 if st["volume"]["state"] == "clean" else 1), \
                f"status exited {r.returncode} with the volume {st['volume']['state']}"
            return st

        def check(self, expect: dict[str, set[str]], cli: bool = False,
                  vanish: frozenset[str] = frozenset()) -> dict:
            """Compare a status report with the model, then adopt it.

            `expect` names the states a command allows for some members; the
            others may only drift (DRIFT). A member leaves the report only as
            the OLD of a replace whose NEW is in sync, or if named in `vanish`.
            """
            st = self.status(cli)
            v = st["volume"]
            seen: dict[str, dict] = {}
            for mem in st["members"]:
                assert mem["path"] not in seen, f"{mem['path']} listed twice: {st['members']}"
                seen[mem["path"]] = mem
            unknown = set(seen) - set(self.state)
            assert not unknown, f"status lists members the model does not know: {unknown}"
            finished = {new for new in self.replacing
                        if seen.get(new, {}).get("state") == "online"}
            leaving = {self.replacing[new] for new in finished} | vanish
            for p, was in list(self.state.items()):
                allowed = expect.get(p, DRIFT[was])
                if p not in seen:
                    assert p in leaving, f"{p} ({was}) is gone from status: {st['members']}"
                    del self.state[p]
                    self.brought.discard(p)
                    for new, old in list(self.replacing.items()):
                        if old == p:
                            del self.replacing[new]
                    continue
                mem = seen[p]
                s = mem["state"]
                assert s in allowed or (p in leaving and s == "failed"), \
                    f"{p}: was {was}, now {s}, expected one of {sorted(allowed)}"
                rb = mem["rebuild"]
                if s == "rebuilding":
                    assert rb is not None and not rb.get("error"), f"{p}: rebuild {rb}"
                    assert 0 <= rb["done_bytes"] <= rb["total_bytes"], f"{p}: rebuild {rb}"
                else:
                    assert rb is None, f"{p} is {s} with a rebuild: {rb}"
                self.state[p] = s
            states = [mem["state"] for mem in st["members"]]
            online = states.count("online")
            # Degraded also while a member not in sync is listed (a failed,
            # stale or missing one whose place was taken): zpool's rule. Not
            # the OLD of a replace that just ended (shown failed as it goes).
            behind = any(mem["state"] in ("failed", "stale", "missing")
                         and mem["path"] not in leaving for mem in st["members"])
            want = ("failed" if online == 0 else "rebuilding" if "rebuilding" in states
                    else "degraded" if online < v["members_expected"] or behind else "clean")
            assert v["state"] == want, f"volume {v['state']} with members {states} and " \
                f"{v['members_expected']} expected: should be {want}"
            assert v["members_expected"] in self.widths, \
                f"members_expected is {v['members_expected']}, should be {self.widths}"
            self.widths = {v["members_expected"]}
            assert v["mounted"]
            return st

        def on_old(self, cmd: str, p: str) -> bool:
            """`raid1fs CMD MNT P`; False if P, the OLD of a replace, was
            refused because the replace finished meanwhile and P is gone."""
            if p not in self.replacing.values():
                self.cli(cmd, mnt, p)
                return True
            r = raid1fs(cmd, mnt, p, check=False)
            if r.returncode == 0:
                return True
            self.check({}, vanish=frozenset([p]))
            assert p not in self.state, f"raid1fs {cmd} {p} exited {r.returncode}: {r.stderr}"
            return False

        def settle(self) -> None:
            """Wait until the OLD of every finished replace is gone."""
            deadline = time.monotonic() + 10
            self.check({})
            while self.leaving():
                assert time.monotonic() < deadline, \
                    f"replaced members still listed: {self.leaving()}"
                time.sleep(0.02)
                self.check({})

        def run_io(self, ops) -> None:
            for op, *args in ops:
                getattr(self, "do_" + op)(*args)

        def do_write(self, off, n, seed):
            write_both(self.disk, self.ref, CHURN_SIZE, off, n, seed)

        def do_read(self, off, n, uncached=False):
            if uncached:
                os.posix_fadvise(self.disk, 0, 0, os.POSIX_FADV_DONTNEED)
            got, want = os.pread(self.disk, n, off), os.pread(self.ref, n, off)
            if got != want:
                at = first_difference(got, want)
                pytest.fail(f"{'uncached ' if uncached else ''}read of {n} at {off} differs "
                            f"from the reference at volume offset {off + at}; members: "
                            f"{self.state}")

        def do_read_uncached(self, off, n):
            self.do_read(off, n, uncached=True)

        def do_verify(self):
            """The whole disk, uncached: readahead spreads it over the members."""
            os.posix_fadvise(self.disk, 0, 0, os.POSIX_FADV_DONTNEED)
            part = CHURN_SIZE // 4  # four readers at once
            with ThreadPoolExecutor(4) as pool:
                got = b"".join(pool.map(lambda i: os.pread(self.disk, part, i * part), range(4)))
            want = os.pread(self.ref, CHURN_SIZE, 0)
            if got != want:
                at = first_difference(got, want)
                pytest.fail(f"uncached read of the whole disk differs from the reference at "
                            f"volume offset {at}; members: {self.state}")

        def do_fsync(self):
            os.fsync(self.disk)

        # ----- data ---------------------------------------------------------

        @rule(ops=io_ops)
        @step
        def io(self, ops):
            self.run_io(ops)

        @rule(ops=io_ops)
        @step
        def pause(self, ops):
            """Let a rate-limited rebuild get on, then I/O."""
            if "rebuilding" in self.state.values():
                time.sleep(0.3)
            self.run_io(ops)

        # ----- members ------------------------------------------------------

        def failable(self) -> list[str]:
            online = self.having("online")
            return [p for p in self.having("rebuilding") + (online if len(online) > 1 else [])
                    if p not in self.leaving()]

        @rule(i=picks, ops=io_ops)
        @step
        def fail(self, i, ops):
            """Fail an online or rebuilding member (never the last online one).
            Failing the NEW of a replace ends the replace (unless it finished
            just before: then its OLD goes); failing its OLD does not."""
            if not (cands := self.failable()):
                return self.run_io(ops)
            p = cands[i % len(cands)]
            old = self.replacing.pop(p, None)
            if self.on_old("fail", p):
                self.check({p: {"failed"}}, vanish=frozenset([old] if old else []))
            self.run_io(ops)

        def unfailable(self) -> list[str]:
            """The last in-sync member (while no rebuild or spare could make
            another), and members failed already."""
            online = self.having("online")
            last = online if len(online) == 1 and not self.having("rebuilding", "spare") else []
            return last + [p for p in self.having("failed") if p not in self.leaving()]

        @rule(i=picks)
        @step
        def fail_refused(self, i):
            if not (cands := self.unfailable()):
                return
            p = cands[i % len(cands)]
            self.cli("fail", mnt, p, ok=False, name=p)
            self.check({})

        def readdable(self) -> list[str]:
            olds = set(self.replacing.values())
            return [p for p in self.having("failed", "stale") if p not in olds]

        @rule(i=picks, ops=io_ops)
        @step
        def readd(self, i, ops):
            """`add` of a failed or stale member: a resync of what it missed."""
            if not (cands := self.readdable()):
                return self.run_io(ops)
            p = cands[i % len(cands)]
            self.cli("add", mnt, p)
            self.brought.add(p)
            self.check({p: SYNCING})
            self.run_io(ops)

        def replaceable(self) -> list[str]:
            # Not one being replaced, nor one replacing another.
            taken = self.leaving() | set(self.replacing) | set(self.replacing.values())
            return [p for p in self.having("online", "failed", "stale") if p not in taken]

        @rule(i=picks, ops=io_ops)
        @step
        def replace(self, i, ops):
            if not (cands := self.replaceable()) or len(self.state) >= MAX_MEMBERS:
                return self.run_io(ops)
            old, new = cands[i % len(cands)], self.fresh()
            self.cli("replace", mnt, old, new)
            self.state[new] = "rebuilding"
            self.brought.add(new)
            self.replacing[new] = old
            self.check({new: SYNCING})
            self.run_io(ops)

        def removable(self) -> list[str]:
            # A spare only while the volume is not short of members (else it
            # may be taking over right now).
            spares = self.having("spare") if self.filled() >= min(self.widths) else []
            return [p for p in self.having("failed", "stale") + spares if p not in self.leaving()]

        @rule(i=picks, ops=io_ops)
        @step
        def remove(self, i, ops):
            """Remove a failed, stale or spare member (the OLD of a replace
            too: its NEW goes on as a plain new member)."""
            if not (cands := self.removable()):
                return self.run_io(ops)
            p = cands[i % len(cands)]
            if not self.on_old("remove", p):
                return self.run_io(ops)
            del self.state[p]
            # The mirror narrows to the members the roster still names (in
            # sync, being rebuilt, failed or stale), down to two ways (a
            # spare may be taking over meanwhile: one more).
            named = self.having("online", "rebuilding", "failed", "stale")
            f = len(named) - len(set(self.replacing.values()) & set(named))
            more = [1] if self.having("spare") else []
            self.widths = {max(2, min(w, f + d)) for w in self.widths for d in [0, *more]}
            self.brought.discard(p)
            self.unused.append(p)
            for new, old in list(self.replacing.items()):
                if old == p:
                    del self.replacing[new]
            self.check({})
            self.run_io(ops)

        def unremovable(self) -> list[str]:
            return [p for p in self.having("online", "rebuilding") if p not in self.leaving()]

        @rule(i=picks)
        @step
        def remove_refused(self, i):
            if not (cands := self.unremovable()):
                return
            p = cands[i % len(cands)]
            self.cli("remove", mnt, p, ok=False, name=p)
            self.check({})

        def newcomer(self, reuse: int | None) -> str:
            """A fresh image, or (reuse) the image of a removed member."""
            if reuse is not None and self.unused:
                return self.unused.pop(reuse % len(self.unused))
            return self.fresh()

        @rule(reuse=st.none() | picks, ops=io_ops)
        @step
        def add(self, reuse, ops):
            """A new member; on a volume not short of members the mirror grows
            by one."""
            if len(self.state) >= MAX_MEMBERS:
                return self.run_io(ops)
            p = self.newcomer(reuse)
            w = min(self.widths)

            def grown(filled: int) -> set[int]:
                """members_expected after the add, with `filled` members
                in sync or being rebuilt (or one more: a spare taking over)."""
                spare = self.having("spare") and filled < w
                return {n + 1 if n >= w else w for n in [filled] + [filled + 1] * bool(spare)}
            # The OLD of a replace leaves once its NEW is in sync: not counted.
            olds = set(self.replacing.values()) & set(self.having("online", "rebuilding"))
            self.widths = grown(self.filled() - len(olds))
            st = self.status()
            before = ([(m["path"].rsplit("/", 1)[-1], m["state"]) for m in st["members"]],
                      st["volume"]["members_expected"])
            self.cli("add", mnt, p)
            self.state[p] = "rebuilding"
            self.brought.add(p)
            try:
                self.check({p: SYNCING})
            except AssertionError as e:
                raise AssertionError(f"{e}\nbefore `add {p}`: {before}") from None
            self.run_io(ops)

        @rule(reuse=st.none() | picks, ops=io_ops)
        @step
        def add_spare(self, reuse, ops):
            if len(self.state) >= MAX_MEMBERS:
                return self.run_io(ops)
            p = self.newcomer(reuse)
            self.cli("add", "--spare", mnt, p)
            self.state[p] = "spare"
            self.brought.add(p)
            self.check({p: {"spare", "rebuilding", "online"}})
            self.run_io(ops)

        def rebuild_takes(self) -> dict[str, set[str]]:
            """What `rebuild` makes of stale members: resyncs them (unless
            replaced) while the mirror is short of members; one whose place
            was taken stays stale (it would be a copy the volume does not
            count)."""
            replaced = set(self.replacing.values())
            stale = [p for p in self.having("stale") if p not in replaced]
            # A running replace's OLD and NEW fill one slot.
            filling = set(self.having("online", "rebuilding"))
            pairs = sum(new in filling and old in filling for new, old in self.replacing.items())
            room = max(self.widths) - (len(filling) - pairs)
            if len(self.widths) == 1 and len(stale) <= room:
                return {p: SYNCING for p in stale}
            if len(self.widths) == 1 and room <= 0:
                return {p: {"stale"} for p in stale}
            return {p: SYNCING | {"stale"} for p in stale}

        @rule(ops=io_ops)
        @step
        def lift_rate(self, ops):
            self.cli("rebuild", "--max-rate", "0", mnt)
            self.rate = None
            st = self.check(self.rebuild_takes())
            assert st["volume"]["max_rebuild_rate"] is None
            self.run_io(ops)

        @rule()
        @step
        def rebuild_wait(self):
            """`rebuild --wait` (lifting a limit under 64M: it would take seconds)."""
            if not self.having("rebuilding", "stale"):
                return
            lift = ["--max-rate", "0"] if self.rate in ("4M", "16M") else []
            if lift:
                self.rate = None
            expect = self.rebuild_takes()
            r = raid1fs("rebuild", "--wait", *lift, mnt, check=False)
            assert r.returncode in (0, 1), f"rebuild --wait exited {r.returncode}: {r.stderr}"
            expect.update({p: {"online"} for p in self.having("rebuilding")})
            expect.update({p: {"spare", "online"} for p in self.having("spare")})
            st = self.check(expect, cli=True)
            states = [m["state"] for m in st["members"]]
            assert "rebuilding" not in states, states
            assert r.returncode == (0 if st["volume"]["state"] == "clean" else 1), \
                f"rebuild --wait exited {r.returncode}, volume {st['volume']['state']}\n{r.stdout}"
            self.settle()

        @rule(bring_failed=st.booleans(), rate=st.sampled_from(RATES), ops=io_ops)
        @step
        def remount(self, bring_failed, rate, ops):
            """umount, then mount the volume's members; failed ones only if
            bring_failed: they come back stale, and are resynced while the
            volume is short of members, else left stale."""
            self.settle()
            os.close(self.disk)
            self.disk = -1
            self.cli("umount", mnt)
            # A replace may have finished just before the umount: its OLD is
            # no member any more. The others' metadata say (they list the OLD
            # of a replace still running, as missing).
            olds = set(self.replacing.values())
            off = offline_status([p for p in self.state if p not in olds])
            assert off["volume"]["clean_shutdown"], f"not clean after umount: {off['volume']}"
            listed = {m["path"] for m in off["members"]}
            for new, old in list(self.replacing.items()):
                if old not in listed:
                    del self.state[old], self.replacing[new]

            members = [p for p, s in self.state.items() if s != "failed" or bring_failed]
            self.mount(members, rate)
            st = self.check({p: {"stale", "rebuilding", "online"} if p in self.brought
                             else {"failed"} for p in self.having("failed", "stale")})
            stale = self.having("stale")
            assert not stale or self.filled() >= st["volume"]["members_expected"], \
                f"short of members, yet {stale} left stale at mount"
            self.run_io(ops)

        @invariant()
        @step
        def consistent(self):
            if self.disk >= 0:
                assert os.fstat(self.disk).st_size == CHURN_SIZE
                self.check({})

        # ----- the end ------------------------------------------------------

        def teardown(self) -> None:
            try:
                if not self.broken and self.disk >= 0:
                    self.finish()
            finally:
                if self.disk >= 0:
                    os.close(self.disk)
                os.close(self.ref)
                if os.path.ismount(mnt):
                    raid1fs("umount", mnt, check=False)

        def wait_rebuilds(self) -> None:
            """Lift the rate limit, take up stale members, wait for every rebuild."""
            self.cli("rebuild", "--max-rate", "0", mnt)
            self.check(self.rebuild_takes())
            deadline = time.monotonic() + 60
            while any(m["rebuild"] and m["rebuild"]["running"]
                      for m in self.status()["members"]):
                assert time.monotonic() < deadline, "rebuilds still running after 60 s"
                time.sleep(0.02)
            r = raid1fs("rebuild", "--wait", mnt, check=False)
            assert r.returncode in (0, 1), f"rebuild --wait exited {r.returncode}: {r.stderr}"
            self.settle()

        def finish(self) -> None:
            """Complete every rebuild, re-add failed members, fill the volume up
            to its width; then the members must hold exactly the reference."""
            for p in self.having("failed"):
                if p not in set(self.replacing.values()):
                    self.cli("add", mnt, p)
                    self.brought.add(p)
                    self.state[p] = "rebuilding"
            self.wait_rebuilds()
            for p in self.having("stale"):  # surplus: its place was taken
                self.cli("remove", mnt, p)
                del self.state[p]
            st = self.check({p: SYNCING | {"spare"} for p in self.state})
            short = st["volume"]["members_expected"] - len(self.having("online"))
            for _ in range(short):
                p = self.fresh()
                self.cli("add", mnt, p)
                self.state[p] = "rebuilding"
            if short > 0:
                self.wait_rebuilds()
            st = self.check({p: {"online", "spare"} for p in self.state}, cli=True)
            assert st["volume"]["state"] == "clean", st["volume"]
            assert not self.replacing, self.replacing

            os.fsync(self.disk)
            drop_cache(mnt / "disk")
            want = sha256(self.ref_path)
            assert sha256(mnt / "disk") == want, "the disk differs from the reference"
            os.close(self.disk)
            self.disk = -1
            self.cli("umount", mnt)
            online, spares = self.having("online"), self.having("spare")
            for p in online:
                assert data_region_hash(p) == want, f"{p} differs from the reference"
            r = raid1fs("status", "--json", *online, *spares, check=False)
            off = json.loads(r.stdout)
            assert r.returncode == 0 and off["volume"]["state"] == "clean", r.stdout
            assert off["volume"]["clean_shutdown"], off["volume"]
            assert sorted((m["path"], m["state"]) for m in off["members"]) == \
                sorted([(p, "online") for p in online] + [(p, "spare") for p in spares])

    ChurnModel.TestCase.settings = settings(
        max_examples=10, stateful_step_count=25, deadline=None,
        # No shrinking: every attempt replays member changes and rebuilds in
        # real time, and shrinking one failure took over five minutes. The
        # failing sequence is printed as found (and replayed first next time).
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    ChurnModel.TestCase().runTest()


# ----- minimal reproductions of what the model above found ---------------------------
# Each fails against raid1fs as it is; the model hits them too, at random.

@pytest.fixture
def small(tmp_path):
    """Three fresh 8M disk members and a mount point, unmounted at the end."""
    cleanup = Cleanup()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cleanup.push(_unmount_raid1fs, str(mnt))
    members = [str(tmp_path / f"{n}.img") for n in "abc"]
    raid1fs("create", "--kind", "disk", "--size", "8M", *members)
    try:
        yield tmp_path, members, mnt
    finally:
        assert not cleanup.run()


def states_of(mnt) -> dict[str, str]:
    return {m["path"]: m["state"] for m in status_json(mnt)["members"]}


def test_remove_and_replace_failed_member_not_given_to_mount(small):
    """Members failed in one mount and not given to the next are listed by
    `status` as failed, but `remove` and `replace` say they are not members."""
    tmp, (a, b, c), mnt = small
    raid1fs("mount", a, b, c, mnt)
    raid1fs("fail", mnt, b)
    raid1fs("fail", mnt, c)
    raid1fs("umount", mnt)
    raid1fs("mount", a, mnt)
    assert states_of(mnt) == {a: "online", b: "failed", c: "failed"}
    r = raid1fs("remove", mnt, b, check=False)
    assert r.returncode == 0, r.stderr
    r = raid1fs("replace", mnt, c, tmp / "d.img", check=False)
    assert r.returncode == 0, r.stderr
    raid1fs("rebuild", "--wait", mnt, check=False)
    assert states_of(mnt) == {a: "online", str(tmp / "d.img"): "online"}


def test_removed_member_can_be_added_back(small):
    """mdadm's `--fail`, `--remove`, `--add` of the same disk: after `remove`
    the mount keeps the image locked, and `add` says it is in use by another
    raid1fs process."""
    tmp, (a, b, c), mnt = small
    raid1fs("mount", a, b, c, mnt)
    raid1fs("fail", mnt, c)
    raid1fs("remove", mnt, c)
    r = raid1fs("add", mnt, c, check=False)
    assert r.returncode == 0, r.stderr
    raid1fs("rebuild", "--wait", mnt)
    assert states_of(mnt)[c] == "online"


def test_failing_the_new_member_of_a_replace_frees_the_old_one(small):
    """Once the NEW member of a replace has failed, the replace is over (its
    roster entry no longer names OLD, a remount forgets it): OLD can be
    replaced again. The failed member's leftover rebuild progress still
    claims OLD, so `replace` says it is already being replaced (and
    `rebuild` would not resync OLD if it were stale)."""
    tmp, (a, b, c), mnt = small
    raid1fs("mount", "--max-rebuild-rate", "1M", a, b, c, mnt)
    raid1fs("replace", mnt, b, tmp / "d.img")
    raid1fs("fail", mnt, tmp / "d.img")
    r = raid1fs("replace", mnt, b, tmp / "e.img", check=False)
    assert r.returncode == 0, r.stderr


def test_add_during_replace_grows_the_mirror_by_one(small):
    """A 2-way mirror, b being replaced by x, then `add y`: the mirror should
    become 3-way. raid1fs counts b and x both and makes it 4-way, so once the
    replace is done the volume (a, x, y online) stays degraded for good."""
    tmp, (a, b, _), mnt = small
    raid1fs("create", "--kind", "disk", "--size", "8M", "--force", a, b)
    raid1fs("mount", "--max-rebuild-rate", "1M", a, b, mnt)
    raid1fs("replace", mnt, b, tmp / "x.img")
    raid1fs("add", mnt, tmp / "y.img")
    raid1fs("rebuild", "--wait", "--max-rate", "0", mnt, check=False)
    st = status_json(mnt)
    assert sorted(states_of(mnt).values()) == ["online"] * 3
    assert (st["volume"]["members_expected"], st["volume"]["state"]) == (3, "clean")


def test_failed_member_given_back_after_another_took_its_place(small):
    """c fails, d is added in its place; at the next mount with c given too,
    c should come back stale. c's metadata (last written before d existed)
    does not list d, which assembly takes for "c went on without d": it
    refuses the mount as split brain between c and d."""
    tmp, (a, b, c), mnt = small
    d = str(tmp / "d.img")
    raid1fs("mount", a, b, c, mnt)
    raid1fs("fail", mnt, c)
    raid1fs("add", mnt, d)
    raid1fs("rebuild", "--wait", mnt, check=False)  # 1: failed c is still listed
    raid1fs("umount", mnt)
    r = raid1fs("mount", a, b, c, d, mnt, check=False)
    assert r.returncode == 0, r.stderr
    assert states_of(mnt)[c] == "stale"


def test_fail_during_the_end_of_a_rebuild_sticks(small):
    """`fail` of a member whose rebuild is in its final fdatasync: the member
    is failed, writes go on without it, then the rebuild's completion marks it
    online again, in sync on paper, without those writes. The member is on
    tools/faultfs, which holds that fdatasync."""
    tmp, (a, _, c), mnt = small
    src, ffs = tmp / "ffs-src", tmp / "ffs"
    src.mkdir()
    ffs.mkdir()
    faultfs("mount", src, ffs)
    try:
        b = str(ffs / "b.img")
        raid1fs("create", "--kind", "disk", "--size", "8M", "--force", a, b, c)
        raid1fs("mount", a, b, c, mnt)
        raid1fs("fail", mnt, b)
        fd = os.open(mnt / "disk", os.O_RDWR)
        try:
            os.pwrite(fd, b"X" * 4096, 0)  # b has 1 MiB to resync
            os.fsync(fd)
            faultfs("set", ffs, "delay", "--delay", "0.3")
            raid1fs("add", mnt, b)
            deadline = time.monotonic() + 30
            while True:  # wait until the copy is done: the fdatasync comes next
                rb = control.request(str(mnt), "status")["members"][1]["rebuild"]
                if rb["done_bytes"] == rb["total_bytes"]:
                    break
                assert time.monotonic() < deadline
                time.sleep(0.005)
            faultfs("set", ffs, "hang")  # b's fdatasync waits
            raid1fs("fail", mnt, b)
            os.pwrite(fd, b"Y" * 4096, 0)  # reaches a and c only
            os.fsync(fd)
            faultfs("set", ffs, "ok")
            time.sleep(1)
            state = states_of(mnt)[b]
        finally:
            os.close(fd)
            raid1fs("umount", mnt, check=False)
        differs = data_region_hash(b) != data_region_hash(a)
        assert state == "failed", f"the failed member came back {state}" + (
            ", without the write made while it was failed" if differs else "")
    finally:
        faultfs("umount", ffs, check=False)
