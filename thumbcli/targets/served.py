"""The served cache: CACHE/v1/<preset>/<source relpath>.<ext> plus the manifest `serve` and nginx read."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Literal

from thumbcli import cache
from thumbcli.discover import absolute_source
from thumbcli.fsutil import rename_beneath
from thumbcli.spec import ThumbSpec, by_preset
from thumbcli.targets.plan import Removal
from thumbcli.targets.state import Origin
from thumbcli.targets.tree import DEFAULT_NAME_TEMPLATE, OutputTree, source_presence

log = logging.getLogger(__name__)


class CacheDirectory(OutputTree):
    """The served cache: CACHE/v1/<preset>/<source relpath>.<ext>, plus a manifest of presets.

    With named (or several) sources: CACHE/v1/<preset>/<source name>/<relpath>.<ext>.

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
        source_folders: Mapping[str, str] | None = None,
        shard: tuple[int, int] = (0, 1),
        retry_failed: bool = False,
        manifest: Literal["enter", "add"] = "enter",
    ) -> None:
        """`manifest`: "enter" this run's presets in the manifest (generate), or only "add" those it lacks
        (generate-on-miss, which must not change what a batch run made; a fresh cache gets its presets)."""
        super().__init__(
            root,
            specs,
            name_template=f"{cache.LAYOUT_DIR}/{DEFAULT_NAME_TEMPLATE}",
            wait_for_lock=wait_for_lock,
            check_collisions=check_collisions,
            locked=locked,
            source_folders=source_folders,
            shard=shard,
            retry_failed=retry_failed,
        )
        self._write_manifest(self._recorded_presets(), replace=manifest == "enter")

    def _recorded_presets(self) -> dict[str, dict[str, object]]:
        """The presets the manifest records now ({} when it is missing or unreadable: written anew)."""
        return cache.load_manifest(self.root, strict=False)

    def _write_manifest(self, presets: dict[str, dict[str, object]], *, replace: bool = True) -> None:
        """Write the manifest: `presets` with this run's specs entered (or, without `replace`, only those it lacks)."""
        entries = {name: cache.manifest_entry(*specs) for name, specs in by_preset(self.specs).items()}
        cache.write_manifest(self.root, presets | entries if replace else entries | presets)

    def prune(
        self,
        *,
        dry_run: bool,
        current: dict[str, str] | None = None,
        sources: Mapping[str, str] | None = None,
        listed: Mapping[str, AbstractSet[str]] | None = None,
    ) -> list[Removal]:
        """Remove thumbnails whose source is gone, whose preset is gone or whose settings changed.

        `current` maps preset name -> settings digest (from the config); None
        means the presets recorded in the manifest are all still wanted. With
        `sources` (the config's named sources, name -> path), a thumbnail of a
        source outside them is removed, and one not under its source's name (a
        cache made before the sources were named) is moved there, not remade.
        `listed`: what bucket places hold, as just listed (see `source_presence`).
        """
        manifest = cache.load_manifest(self.root, strict=False)
        if current is None:
            current = {name: str(entry.get("digest")) for name, entry in manifest.items()}
        named_roots = sorted(
            ((os.fsencode(absolute_source(path)).rstrip(b"/") + b"/", name) for name, path in (sources or {}).items()),
            key=lambda root_name: -len(root_name[0]),
        )
        # A preset made in several formats is current in each of them while its fallback is unchanged.
        digests = {
            name: {digest, *_variant_digests(manifest.get(name, {}), digest)} for name, digest in current.items()
        }
        removals: list[Removal] = []
        moves: list[tuple[str, str, Origin]] = []
        origins = self._state.origins()
        exists = source_presence((origin.source for _, origin in origins), listed)
        for out, origin in origins:
            if origin.preset not in current:
                reason = f"preset {origin.preset} is no longer configured"
            elif origin.digest not in digests[origin.preset]:
                reason = f"preset {origin.preset} settings changed"
            elif not exists(origin.source):
                reason = "source is gone"
            elif named_roots:
                placed = self._placement(out, origin.source, origin.preset, named_roots)
                if placed is None:
                    reason = "source is not one of the config's [sources]"
                elif placed == out:
                    continue
                elif self._holds(placed):
                    reason = f"made again as {placed}"
                else:
                    moves.append((out, placed, origin))
                    removals.append(dataclasses.replace(self._removal(out, f"moved to {placed}"), bytes=0))
                    continue
            else:
                continue
            removals.append(self._removal(out, reason))
        if dry_run:
            return removals
        moved = {self.root / out: self._move(out, placed, origin) for out, placed, origin in moves}
        self._remove(removals, moved, listed)
        kept = {name: entry for name, entry in manifest.items() if name in current}
        if kept != manifest:
            self._write_manifest(kept)
        return removals

    @staticmethod
    def _placement(out: str, source: bytes, preset: str, named_roots: list[tuple[bytes, str]]) -> str | None:
        """Where a thumbnail of `source` belongs under the named sources (deepest root first), or None if outside."""
        suffix = out.rpartition(".")[2]
        placements = [
            f"{cache.LAYOUT_DIR}/{preset}/{name}/{os.fsdecode(source[len(root) :])}.{suffix}"
            for root, name in named_roots
            if source.startswith(root)
        ]
        if out in placements:
            return out
        return placements[0] if placements else None

    def _holds(self, relative: str) -> bool:
        """Whether there is a thumbnail (or anything) at `relative` already."""
        return os.path.lexists(self.root / relative)

    def _move(self, out: str, placed: str, origin: Origin) -> bool:
        """Move a thumbnail to where its named source's layout puts it, with its record; False if it cannot be."""
        try:
            rename_beneath(self.root, out, placed)
        except OSError:
            return False
        self._state.record(placed, origin)
        return True


def _variant_digests(entry: dict[str, object], fallback_digest: str) -> list[str]:
    """The digests of every format of a manifest entry whose fallback still has `fallback_digest`."""
    listed = entry.get("digests")
    if entry.get("digest") != fallback_digest or not isinstance(listed, list):
        return []
    return [str(digest) for digest in listed]
