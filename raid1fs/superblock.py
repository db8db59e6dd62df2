"""The on-disk format of a member: superblock and reserved regions.

See docs/format.md for the full description. In short, a disk member is

    0        superblock copy 0 (4 KiB)
    4 KiB    superblock copy 1 (4 KiB)
    64 KiB   write-intent bitmap, then the missed-writes bitmap
    ...      per-block CRC32C checksums (4 bytes per 4 KiB block)
    DATA     the volume's data, DATA a multiple of 1 MiB

A superblock block is a fixed binary header followed by a JSON document:

    magic  8s  b"RAID1FS\\0"
    format u32 little-endian
    crc    u32 CRC32C of the whole 4 KiB block with this field zeroed
    seq    u64 sequence number: copy (seq % 2) is written, the higher valid wins
    length u32 bytes of JSON that follow
    JSON   UTF-8, then zero padding to 4 KiB

The two copies are written alternately, each followed by fsync, so a torn
write can only damage the copy being written; the other still holds the
previous state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any

import crc32c

from raid1fs.errors import BadMemberError, MetadataError

MAGIC = b"RAID1FS\0"
FORMAT = 1
SB_SIZE = 4096
SB_COPIES = 2
SB_RESERVED = 64 << 10  # room for the superblock copies and future growth
BLOCK_SIZE = 4096  # checksum granularity
CSUM_SIZE = 4
DATA_ALIGN = 1 << 20
MIN_REGION = 1 << 20
MAX_REGIONS = 1 << 22
_HEADER = struct.Struct("<8sIIQI")

# Roster states of a slot, as recorded by the members that were online.
ACTIVE = "active"  # an in-sync member of the volume
FAILED = "failed"  # was failed while mounted: stale until rebuilt
MISSING = "missing"  # was absent at a degraded mount: stale until rebuilt
SPARE = "spare"  # a hot spare
REBUILDING = "rebuilding"  # being rebuilt; rebuild_pos is its checkpoint
REMOVED = "removed"  # an empty slot: its member was removed
REMOVED_KEPT = 16  # removed member UUIDs a superblock remembers (~640 bytes of 4 KiB)
ROSTER_STATES = (ACTIVE, FAILED, MISSING, SPARE, REBUILDING, REMOVED)
ABSENT_STATES = (FAILED, MISSING)  # slots that miss writes


def align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Layout:
    """Where each region of a disk member lies; derived from the volume size."""

    size: int
    region_size: int
    bitmap_offset: int
    bitmap_bytes: int
    csum_offset: int
    csum_bytes: int
    data_offset: int

    @classmethod
    def for_size(cls, size: int) -> Layout:
        region = MIN_REGION
        while -(-size // region) > MAX_REGIONS:
            region *= 2
        nregions = -(-size // region)
        bitmap_bytes = align_up(-(-nregions // 8), 4096)
        bitmap_offset = SB_RESERVED
        csum_offset = bitmap_offset + 2 * bitmap_bytes
        csum_bytes = align_up(-(-size // BLOCK_SIZE) * CSUM_SIZE, 4096)
        data_offset = align_up(csum_offset + csum_bytes, DATA_ALIGN)
        return cls(size, region, bitmap_offset, bitmap_bytes, csum_offset, csum_bytes, data_offset)

    @property
    def member_bytes(self) -> int:
        """Bytes a disk member needs to hold this volume."""
        return self.data_offset + self.size


@dataclass
class Slot:
    """One entry of the roster: who holds a slot and in what state."""

    uuid: str
    state: str
    path: str = ""
    # For a rebuilding slot: every region below rebuild_pos (bytes) that
    # needed copying has been copied; rebuild_full: all of it needs copying
    # (its history is unknown), else only the regions the bitmaps name.
    rebuild_pos: int = 0
    rebuild_full: bool = False
    # For a rebuilding slot started by `replace`: the member UUID removed
    # from the volume when this one is in sync.
    replaces: str = ""
    # For a failed or missing slot: the event counter of the commit that
    # first recorded it gone. Its member's own counter is lower, unless the
    # member was mounted apart from the volume since (split brain). 0: not
    # known (the slot went away before this field existed).
    gone_events: int = 0


@dataclass
class Superblock:
    """The metadata a member carries about itself and its volume."""

    volume_uuid: str
    name: str
    kind: str
    member_uuid: str
    slot: int
    members_expected: int
    events: int
    clean: bool
    size: int
    data_offset: int
    region_size: int
    bitmap_offset: int
    bitmap_bytes: int
    csum_offset: int
    csum_bytes: int
    checksums: bool
    created: float
    roster: list[Slot] = field(default_factory=list)
    # The event counter when the missed-writes bitmap was last emptied: it
    # names every region written since, while any member was away. A member
    # whose own counter is older needs a full rebuild.
    missed_since: int = 0
    # What chmod, chown and utimens set on the mount's `disk` file: "mode"
    # (permission bits), "uid", "gid", "atime_ns", "mtime_ns"; each optional.
    attrs: dict[str, int] = field(default_factory=dict)
    # Member UUIDs removed from the volume, the latest REMOVED_KEPT: a member
    # given back to assembly after its removal is recognised by any member
    # that lists it here, whatever its own metadata says (it may have been
    # mounted alone since). A removed member's own copy, written as it
    # leaves when it still can be, names it too.
    removed: list[str] = field(default_factory=list)
    format: int = FORMAT
    seq: int = 0  # not part of the JSON: lives in the header

    @staticmethod
    def new_uuid() -> str:
        return str(uuidlib.uuid4())

    def copy(self) -> Superblock:
        return dataclasses.replace(self, roster=[dataclasses.replace(s) for s in self.roster],
                                   attrs=dict(self.attrs), removed=list(self.removed))

    def drop(self, entry: Slot) -> None:
        """Empty a roster slot: its member is removed from the volume."""
        if entry.uuid:
            self.removed = [u for u in self.removed if u != entry.uuid][-(REMOVED_KEPT - 1):]
            self.removed.append(entry.uuid)
        entry.state, entry.uuid = REMOVED, ""

    def was_removed(self, member_uuid: str) -> bool:
        return member_uuid in self.removed

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("seq")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Superblock:
        names = {f.name for f in dataclasses.fields(cls)} - {"seq", "roster"}
        optional = {"format", "missed_since", "attrs", "removed"}
        missing = [n for n in names if n not in d and n not in optional]
        if missing:
            raise ValueError(f"fields missing: {', '.join(sorted(missing))}")
        kw = {n: d[n] for n in names if n in d}
        kw["roster"] = [Slot(**s) for s in d.get("roster", [])]
        bad = [s.state for s in kw["roster"] if s.state not in ROSTER_STATES]
        if bad:
            raise ValueError(f"unknown roster state {bad[0]!r}")
        return cls(**kw)

    def roster_entry(self, member_uuid: str) -> Slot | None:
        for s in self.roster:
            if s.uuid == member_uuid:
                return s
        return None

    def encode(self) -> bytes:
        payload = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()
        while _HEADER.size + len(payload) > SB_SIZE and self.removed:
            self.removed.pop(0)  # the oldest removal is forgotten first
            payload = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()
        if _HEADER.size + len(payload) > SB_SIZE:
            raise MetadataError(f"superblock of member {self.member_uuid} is too large")
        block = bytearray(SB_SIZE)
        _HEADER.pack_into(block, 0, MAGIC, FORMAT, 0, self.seq, len(payload))
        block[_HEADER.size : _HEADER.size + len(payload)] = payload
        struct.pack_into("<I", block, 12, crc32c.crc32c(bytes(block)))
        return bytes(block)

    @classmethod
    def decode(cls, block: bytes) -> Superblock:
        """Decode one copy; ValueError says why it is not valid."""
        if len(block) < SB_SIZE:
            raise ValueError("short read")
        magic, fmt, crc, seq, length = _HEADER.unpack_from(block, 0)
        if magic != MAGIC:
            raise ValueError("no raid1fs signature")
        if fmt != FORMAT:
            raise ValueError(f"unsupported format {fmt}")
        zeroed = bytearray(block[:SB_SIZE])
        struct.pack_into("<I", zeroed, 12, 0)
        if crc32c.crc32c(bytes(zeroed)) != crc:
            raise ValueError("checksum mismatch")
        if length > SB_SIZE - _HEADER.size:
            raise ValueError("bad length")
        try:
            d = json.loads(block[_HEADER.size : _HEADER.size + length])
            sb = cls.from_json(d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"unreadable metadata: {e}") from None
        sb.seq = seq
        return sb


def read_bitmaps(fd: int, sb: Superblock) -> tuple[bytes, bytes]:
    """The write-intent and missed-writes bitmaps of a disk member, raw."""
    raw = os.pread(fd, 2 * sb.bitmap_bytes, sb.bitmap_offset)
    raw = raw.ljust(2 * sb.bitmap_bytes, b"\0")
    return raw[: sb.bitmap_bytes], raw[sb.bitmap_bytes :]


def has_signature(fd: int, base: int = 0) -> bool:
    """True if either superblock copy starts with the raid1fs magic."""
    for i in range(SB_COPIES):
        if os.pread(fd, len(MAGIC), base + i * SB_SIZE) == MAGIC:
            return True
    return False


def read_superblock(fd: int, name: str, base: int = 0) -> tuple[Superblock, list[str]]:
    """Read both copies and return the valid one with the higher sequence.

    Also returns the problems found with the other copy (for status). Raises
    MetadataError naming `name` when neither copy is valid.
    """
    best: Superblock | None = None
    problems: list[str] = []
    unreadable = False
    for i in range(SB_COPIES):
        try:
            block = os.pread(fd, SB_SIZE, base + i * SB_SIZE)
            if not block:  # an empty image, say: nothing was ever written here
                problems.append(f"copy {i}: no signature (the member ends before it)")
                continue
            sb = Superblock.decode(block)
        except OSError as e:
            problems.append(f"copy {i}: {e.strerror}")
            unreadable = True
            continue
        except ValueError as e:
            problems.append(f"copy {i}: {e}")
            continue
        if best is None or sb.seq > best.seq:
            best = sb
    if best is None:
        if unreadable:  # the device failed, not (as far as is known) the metadata
            raise BadMemberError(f"{name}: cannot read its metadata ({'; '.join(problems)})")
        if not any("signature" not in p for p in problems):
            raise MetadataError(f"{name}: not a raid1fs member (no raid1fs superblock)")
        raise MetadataError(f"{name}: corrupted raid1fs metadata ({'; '.join(problems)})")
    return best, problems


def write_superblock(fd: int, sb: Superblock, base: int = 0) -> None:
    """Write the next copy (alternating) and make it durable. Bumps sb.seq.

    Durable with RWF_DSYNC: this block only. An fsync would also flush all
    of the member's dirty data, which under load makes every metadata
    update (a rebuild checkpoint, say) wait for gigabytes. Whoever needs
    data durable with the metadata syncs it first (docs/write-ordering.md).
    """
    sb.seq += 1
    block = sb.encode()
    n = os.pwritev(fd, [block], base + (sb.seq % SB_COPIES) * SB_SIZE, os.RWF_DSYNC)
    if n != len(block):
        raise OSError(5, "short superblock write")
