"""A directory laid out and updated the way the kubelet mounts a Kubernetes Secret.

``<root>/<name>`` is a symlink to ``..data/<name>``; ``..data`` is a symlink to a timestamped
directory holding the real files. An update writes a new timestamped directory, points a new
symlink at it and renames that over ``..data`` (one atomic step), then deletes the old
directory. Readers that open ``<root>/<name>`` see either the old or the new content.
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

__all__ = ["SecretMount"]


class SecretMount:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._versions = itertools.count(1)

    def path(self, name: str) -> Path:
        return self.root / name

    def update(self, files: dict[str, bytes | str]) -> None:
        """Swap in a new version holding exactly ``files`` (name -> content)."""
        version = self.root / f"..2026_11_26_{next(self._versions):04d}"
        version.mkdir()
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            (version / name).write_bytes(data)
        data_link = self.root / "..data"
        old = data_link.resolve() if data_link.is_symlink() else None
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(version.name)
        os.replace(tmp, data_link)
        for name in files:
            if not (self.root / name).is_symlink():
                (self.root / name).symlink_to(f"..data/{name}")
        if old is not None:
            shutil.rmtree(old)
