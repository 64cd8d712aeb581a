"""The served cache: CACHE/v1/<preset>/<source relpath>.<ext> plus the manifest `serve` and nginx read."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from thumbcli import cache
from thumbcli.spec import ThumbSpec
from thumbcli.targets.plan import Removal
from thumbcli.targets.tree import DEFAULT_NAME_TEMPLATE, OutputTree


class CacheDirectory(OutputTree):
    """The served cache: CACHE/v1/<preset>/<source relpath>.<ext>, plus a manifest of presets.

    The layout is `thumbcli.cache`'s; `thumbcli serve` and nginx map URLs with it.
    """

    def __init__(
        self,
        root: Path,
        specs: tuple[ThumbSpec, ...],
        *,
        wait_for_lock: bool = False,
        check_collisions: bool = True,
        locked: bool = True,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        super().__init__(
            root,
            specs,
            name_template=f"{cache.LAYOUT_DIR}/{DEFAULT_NAME_TEMPLATE}",
            wait_for_lock=wait_for_lock,
            check_collisions=check_collisions,
            locked=locked,
            shard=shard,
        )
        self._write_manifest(cache.load_manifest(root, strict=False))

    def _write_manifest(self, presets: dict[str, dict[str, object]]) -> None:
        """Write the manifest: `presets` with this run's specs entered (or updated)."""
        cache.write_manifest(self.root, presets | {spec.name: cache.manifest_entry(spec) for spec in self.specs})

    def prune(self, current: dict[str, str] | None, *, dry_run: bool) -> list[Removal]:
        """Remove thumbnails whose source is gone, whose preset is gone or whose settings changed.

        `current` maps preset name -> settings digest (from the config); None
        means the presets recorded in the manifest are all still wanted.
        """
        manifest = cache.load_manifest(self.root, strict=False)
        if current is None:
            current = {name: str(entry.get("digest")) for name, entry in manifest.items()}
        removals: list[Removal] = []
        for out, origin in self._state.origins():
            if origin.preset not in current:
                reason = f"preset {origin.preset} is no longer configured"
            elif origin.digest != current[origin.preset]:
                reason = f"preset {origin.preset} settings changed"
            elif not os.path.lexists(origin.source):
                reason = "source is gone"
            else:
                continue
            path = self.root / out
            try:
                size = path.stat().st_size
            except OSError:
                size = 0
            removals.append(Removal(path, size, reason))
        if dry_run:
            return removals
        for removal in removals:
            with contextlib.suppress(FileNotFoundError):
                removal.path.unlink()
        self._state.forget(str(removal.path.relative_to(self.root)) for removal in removals)
        for directory in sorted({removal.path.parent for removal in removals}, key=lambda p: -len(p.parts)):
            while directory != self.root and directory.is_relative_to(self.root):
                try:
                    directory.rmdir()
                except OSError:
                    break
                directory = directory.parent
        self._state.forget_signatures(os.path.isdir)
        kept = {name: entry for name, entry in manifest.items() if name in current}
        if kept != manifest:
            self._write_manifest(kept)
        return removals
