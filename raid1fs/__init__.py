"""raid1fs: software RAID-1 for Linux over FUSE."""

__version__ = "0.1.0"
