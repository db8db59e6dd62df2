"""Unit tests of the on-disk format: layout, encoding, the two-copy rule."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raid1fs.errors import MetadataError
from raid1fs.superblock import (
    ACTIVE,
    SB_SIZE,
    Layout,
    Slot,
    Superblock,
    read_superblock,
    write_superblock,
)


def make_sb(size: int = 1 << 30, name: str = "v") -> Superblock:
    lay = Layout.for_size(size)
    return Superblock(
        volume_uuid=Superblock.new_uuid(), name=name, kind="disk",
        member_uuid=Superblock.new_uuid(), slot=0, members_expected=2, events=1, clean=True,
        size=size, data_offset=lay.data_offset, region_size=lay.region_size,
        bitmap_offset=lay.bitmap_offset, bitmap_bytes=lay.bitmap_bytes,
        csum_offset=lay.csum_offset, csum_bytes=lay.csum_bytes, checksums=True, created=0.0,
        roster=[Slot(Superblock.new_uuid(), ACTIVE, "/a"),
                Slot(Superblock.new_uuid(), ACTIVE, "/b")],
    )


@given(st.integers(min_value=1, max_value=1 << 50).map(lambda n: n * 4096))
def test_layout_regions_do_not_overlap(size):
    """Every region fits before the data, and the data offset is 1 MiB aligned."""
    lay = Layout.for_size(size)
    assert lay.data_offset % (1 << 20) == 0
    assert 2 * SB_SIZE <= lay.bitmap_offset
    assert lay.bitmap_offset + 2 * lay.bitmap_bytes <= lay.csum_offset
    assert lay.csum_offset + lay.csum_bytes <= lay.data_offset
    assert lay.bitmap_bytes * 8 * lay.region_size >= size  # one bit covers each region
    assert lay.csum_bytes >= size // 4096 * 4


@settings(max_examples=50)
@given(st.text(max_size=60), st.integers(min_value=0, max_value=1 << 60), st.booleans())
def test_encode_decode_round_trip(name, events, clean):
    sb = make_sb(name=name)
    sb.events, sb.clean, sb.seq = events, clean, 7
    back = Superblock.decode(sb.encode())
    assert back == sb


def test_any_flipped_byte_is_detected():
    """A single corrupted byte anywhere in a copy makes it invalid."""
    block = bytearray(make_sb().encode())
    for pos in range(0, SB_SIZE, 97):
        bad = bytearray(block)
        bad[pos] ^= 0x5A
        with pytest.raises(ValueError):
            Superblock.decode(bytes(bad))


def test_torn_write_keeps_previous_copy(tmp_path):
    """Copies alternate: with the newest copy torn, the previous state is read."""
    p = tmp_path / "m.img"
    p.write_bytes(bytes(1 << 20))
    fd = os.open(p, os.O_RDWR)
    try:
        sb = make_sb()
        write_superblock(fd, sb)
        sb.events = 2
        write_superblock(fd, sb)
        sb.events = 3
        write_superblock(fd, sb)  # seq 3 -> copy 1
        got, problems = read_superblock(fd, str(p))
        assert got.events == 3 and not problems
        os.pwrite(fd, b"\xff" * 512, 1 * SB_SIZE + 100)  # tear copy 1
        got, problems = read_superblock(fd, str(p))
        assert got.events == 2 and len(problems) == 1
        os.pwrite(fd, b"\xff" * 512, 0 * SB_SIZE + 100)  # and copy 0
        with pytest.raises(MetadataError, match="corrupted"):
            read_superblock(fd, str(p))
    finally:
        os.close(fd)


def test_blank_file_is_not_a_member(tmp_path):
    p = tmp_path / "z.img"
    p.write_bytes(bytes(1 << 20))
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(MetadataError, match="not a raid1fs member"):
            read_superblock(fd, str(p))
    finally:
        os.close(fd)
