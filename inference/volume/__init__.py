"""Volume layer: whole-disk writes -> (volume, offset inside it) through MBR, GPT and LVM2 (see map.py)."""

from inference.volume.map import Volume, VolumeMap

__all__ = ["Volume", "VolumeMap"]
