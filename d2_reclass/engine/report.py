"""What a reclass did: per tensor and per class space, as a log table and as JSON."""
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from tabulate import tabulate

from ..classes import ClassMapping

__all__ = ["NOT_RECOGNISED", "TensorAction", "SpaceReport", "ReclassReport"]

#: The layout named for a tensor whose shape differs from the model's and that no class layout
#: claims: skipped as stock detectron2 skips it, and an error in ``strict`` mode.
NOT_RECOGNISED = "not recognised"


@dataclass
class TensorAction:
    """What happened to one checkpoint tensor.

    ``action`` is one of ``"mapped"`` (some entries copied or merged, some fresh),
    ``"copied"`` (every entry copied: reordered, subset or split), ``"merged"`` (every entry
    copied or merged, some merged), ``"fresh"`` (every class entry fresh; a background block is
    still carried over), ``"model's own"`` (a dataset-derived buffer or a vocabulary kept from
    the model), or ``"skipped"`` (a mismatch that is not about classes, or of a tensor no
    layout recognises (``layout`` :data:`NOT_RECOGNISED`, ``space`` empty), left to fvcore,
    which skips it as stock detectron2 does). ``copied``, ``fresh`` and ``merged`` count
    entries along the class axis; ``copied`` includes the background block, ``merged`` counts
    entries computed from several source classes (in the JSON only when there are any).
    """

    key: str
    space: str
    checkpoint_shape: Tuple[int, ...]
    model_shape: Tuple[int, ...]
    action: str
    copied: int = 0
    fresh: int = 0
    layout: str = ""
    merged: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.merged:
            del d["merged"]
        return d


@dataclass
class SpaceReport:
    """How one class space was resolved: ``map``, ``reinit`` or ``unchanged``.

    ``source_from`` names where the source class names came from (a config key, an option,
    "the names stored in ..."), None when they were unknown.
    """

    space: str
    resolution: str
    num_source: Optional[int]
    num_target: Optional[int]
    mapping: Optional[ClassMapping] = None
    source_from: Optional[str] = None

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "mapping"}
        d["mapping"] = self.mapping.to_dict() if self.mapping is not None else None
        return d


@dataclass
class ReclassReport:
    """The full account of one reclass: requested mode, seed, class spaces and tensors.

    ``source`` names the checkpoint; ``more_sources`` the further checkpoints combined with it,
    whose number ``c`` in a mapping's ``checkpoint`` is ``c`` here (counting from 1).
    """

    mode: str
    seed: int
    spaces: Dict[str, SpaceReport] = field(default_factory=dict)
    tensors: List[TensorAction] = field(default_factory=list)
    mismatches: List[TensorAction] = field(default_factory=list)
    source: str = ""
    #: What MODEL.RECLASS.NEW_CLASS_INIT did after the mapping (a new_classes.NewClassReport).
    new_classes: Optional[Any] = None
    more_sources: List[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.tensors)

    @property
    def unrecognised(self) -> List[TensorAction]:
        """The mismatched tensors no layout recognises (possibly class heads of unknown kind)."""
        return [t for t in self.mismatches if t.layout == NOT_RECOGNISED]

    def tensor(self, key: str) -> TensorAction:
        """The entry for ``key`` (KeyError if the reclass did not touch it)."""
        for t in self.tensors + self.mismatches:
            if t.key == key:
                return t
        raise KeyError(f"{key} is not in this report")

    def to_dict(self) -> dict:
        out = {
            "source": self.source,
            "mode": self.mode,
            "seed": self.seed,
            "spaces": {k: v.to_dict() for k, v in self.spaces.items()},
            "tensors": [t.to_dict() for t in self.tensors],
            "mismatches": [t.to_dict() for t in self.mismatches],
            "new_classes": self.new_classes.to_dict() if self.new_classes is not None else None,
        }
        if self.more_sources:
            out["more_sources"] = list(self.more_sources)
        return out

    def to_json(self, path: Optional[str] = None) -> str:
        """The report as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            from iopath.common.file_io import g_pathmgr

            with g_pathmgr.open(path, "w") as f:
                f.write(text + "\n")
        return text

    def mapping_table(self) -> str:
        """One row per target class: where its rows came from; then the dropped source classes.

        A split source class, a merge and, when checkpoints were combined, the checkpoint of
        each class are shown on its row; a fresh class whose name is close to a dropped source
        class is flagged.
        """
        rows = []
        for space in self.spaces.values():
            m = space.mapping
            if m is None or space.resolution == "unchanged":
                continue
            close = dict(m.close)
            copies = Counter((m.checkpoint_of(j), m.parts(j)[0]) for j in range(len(m.target))
                             if len(m.parts(j)) == 1)
            for j, t in enumerate(m.target):
                c, parts = m.checkpoint_of(j), m.parts(j)
                names = [m.source_name(i, c) for i in parts]
                origin = self._checkpoint_prefix(c) + " + ".join(
                    f"{n} [{i}]" for n, i in zip(names, parts))
                if len(parts) > 1:
                    origin += " (merged)"
                elif parts and copies[c, parts[0]] > 1:
                    origin += f" (split into {copies[c, parts[0]]})"
                elif not parts:
                    origin = self._new_class_origin(t)
                    if t in close:
                        origin += f" (close to dropped {close[t]!r})"
                rows.append((space.space, t, origin))
            for c in range(1 + len(m.more)):
                dropped = m.unused(c)
                if dropped:
                    shown = ", ".join(dropped[:8]) + (", ..." if len(dropped) > 8 else "")
                    rows.append((space.space, f"({len(dropped)} dropped)",
                                 self._checkpoint_prefix(c) + shown))
        return tabulate(rows, headers=["space", "target class", "from source"], tablefmt="pipe")

    def _new_class_origin(self, name: str) -> str:
        """``"fresh"`` (the head's init), or how NEW_CLASS_INIT started the class, so that the
        mapping table agrees with the new-class table below it."""
        done = {c.name: c for c in self.new_classes.classes} if self.new_classes else {}
        init = done.get(name)
        if init is None or init.method == "head":
            return "fresh"
        return f"new: {init.method}" + (f" (relative {init.relative})" if init.relative else "")

    def _checkpoint_prefix(self, checkpoint: int) -> str:
        """``"name: "`` of a checkpoint when several were combined, else nothing."""
        if not self.more_sources:
            return ""
        return ([self.source] + self.more_sources)[checkpoint] + ": "

    def table(self) -> str:
        """Every touched tensor: shapes, action and entries copied / fresh."""
        rows = [
            (t.key, str(t.checkpoint_shape), str(t.model_shape), t.action,
             f"{t.copied} (+{t.merged} merged)" if t.merged else t.copied, t.fresh, t.layout)
            for t in self.tensors + self.mismatches
        ]
        return tabulate(
            rows,
            headers=["tensor", "checkpoint", "model", "action", "copied", "fresh", "layout"],
            tablefmt="pipe",
        )

    def summary(self) -> str:
        spaces = ", ".join(
            f"{s.space}: {s.resolution} ({s.num_source} -> {s.num_target} classes)"
            for s in self.spaces.values()
        )
        line = f"mode={self.mode} seed={self.seed}; {spaces or 'no class-dependent tensors'}"
        if self.unrecognised:
            line += (f"; {len(self.unrecognised)} tensors of another shape than the model's not "
                     "recognised (skipped)")
        return line

    def __str__(self) -> str:
        parts = [self.summary()]
        parts += [f"{s.space} source class names: {s.source_from}" for s in self.spaces.values()
                  if s.resolution == "map" and s.source_from]
        if any(s.resolution != "unchanged" for s in self.spaces.values()):
            parts.append(self.mapping_table())
        if self.tensors or self.mismatches:
            parts.append(self.table())
        if self.new_classes is not None and self.new_classes.classes:
            parts.append(str(self.new_classes))
        return "\n".join(parts)
