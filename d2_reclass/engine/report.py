"""What a reclass did: per tensor and per class space, as a log table and as JSON."""
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

from tabulate import tabulate

from ..classes import ClassMapping
from ..entries import source_parts

__all__ = ["NOT_RECOGNISED", "TensorAction", "SpaceReport", "ReclassReport"]

#: The layout named for a tensor whose shape differs from the model's and that no class layout
#: claims: skipped as stock detectron2 skips it, and an error in ``strict`` mode.
NOT_RECOGNISED = "not recognised"

#: Up to this many rows the log shows the whole mapping table (and the whole new-class table);
#: past it, a summary: the count of each kind of row and the first rows of each.
FULL_TABLE_ROWS = 30
#: Rows of each kind the summary shows.
FIRST_ROWS = 5

#: The kinds of mapping rows: a class copied from the source class at its own position, one
#: copied from another position, a merge, a class no source knows, the dropped source classes.
KEPT, REORDERED, MERGED, NEW, DROPPED = "kept", "reordered", "merged", "new", "dropped"
ROW_KINDS = (KEPT, REORDERED, MERGED, NEW, DROPPED)
_MAPPING_HEADERS = ["space", "target class", "from source"]


class _MappingRow(NamedTuple):
    kind: str  # one of ROW_KINDS
    space: "SpaceReport"
    index: int  # the target class; for a DROPPED row, the checkpoint whose classes it lists
    classes: int = 1  # the classes it stands for (a DROPPED row lists several)


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
        return _pipe_table(self._format_rows(self._mapping_rows()), _MAPPING_HEADERS)

    def mapping_summary(self, full_report: str = "") -> str:
        """The mapping as a person reads it in one screen: the whole :meth:`mapping_table` up
        to :data:`FULL_TABLE_ROWS` rows; past that, per class space the count of each kind of
        row (:data:`ROW_KINDS`), the first :data:`FIRST_ROWS` rows of each kind, and where
        every row is. Only the rows shown are formatted.

        Args:
            full_report: the file the full report is written to (``reclass_report.json``),
                named in the summary; empty: the summary names the methods that give it.
        """
        rows = self._mapping_rows()
        if len(rows) <= FULL_TABLE_ROWS:
            return _pipe_table(self._format_rows(rows), _MAPPING_HEADERS)
        counts, table, splits = [], [], {}
        for space in dict.fromkeys(r.space.space for r in rows):
            by_kind = {kind: [r for r in rows if r.space.space == space and r.kind == kind]
                       for kind in ROW_KINDS}
            counts.append(f"{space}: " + ", ".join(
                f"{sum(r.classes for r in of_kind)} {kind}" for kind, of_kind in by_kind.items()))
            for kind, of_kind in by_kind.items():
                table += self._format_rows(of_kind[:FIRST_ROWS], splits)
                if len(of_kind) > FIRST_ROWS:
                    table.append((space, "...", f"{len(of_kind) - FIRST_ROWS} more {kind}"))
        where = (f"every row is in {full_report}" if full_report else
                 "every row: ReclassReport.mapping_table(), or to_json()")
        return "\n".join(counts + [
            f"The first {FIRST_ROWS} rows of each kind ({len(rows)} rows in all; {where}):",
            _pipe_table(table, _MAPPING_HEADERS)])

    def _mapping_rows(self) -> List[_MappingRow]:
        """The rows of :meth:`mapping_table` as kinds and positions, nothing formatted."""
        rows: List[_MappingRow] = []
        for space in self.spaces.values():
            m = space.mapping
            if m is None or space.resolution == "unchanged":
                continue
            for j, index in enumerate(m.source_index):
                parts = source_parts(index)
                kind = NEW if not parts else MERGED if len(parts) > 1 else \
                    KEPT if parts[0] == j else REORDERED
                rows.append(_MappingRow(kind, space, j))
            for c in range(1 + len(m.more)):
                dropped = len(m.unused(c))
                if dropped:
                    rows.append(_MappingRow(DROPPED, space, c, dropped))
        return rows

    def _format_rows(self, rows: Sequence[_MappingRow], splits: Optional[Dict[str, Counter]] = None
                     ) -> List[Tuple[str, str, str]]:
        """(space, target class, from source) of each of ``rows``; ``splits`` keeps, per
        space, how many target classes copy each source class, across calls."""
        new_inits = {c.name: c for c in self.new_classes.classes if c.method != "head"} \
            if self.new_classes else {}
        splits = {} if splits is None else splits
        out = []
        for row in rows:
            m = row.space.mapping
            if row.kind == DROPPED:
                dropped = m.unused(row.index)
                shown = ", ".join(dropped[:8]) + (", ..." if len(dropped) > 8 else "")
                out.append((row.space.space, f"({len(dropped)} dropped)",
                            self._checkpoint_prefix(row.index) + shown))
                continue
            j = row.index
            t, c, parts = m.target[j], m.checkpoint_of(j), m.parts(j)
            if row.kind == NEW:
                origin = _new_class_origin(new_inits.get(t))
                close = dict(m.close)
                if t in close:
                    origin += f" (close to dropped {close[t]!r})"
                out.append((row.space.space, t, origin))
                continue
            origin = self._checkpoint_prefix(c) + " + ".join(
                f"{m.source_name(i, c)} [{i}]" for i in parts)
            if row.kind == MERGED:
                origin += " (merged)"
            else:
                if row.space.space not in splits:  # how many targets copy each source class
                    splits[row.space.space] = Counter(
                        (m.checkpoint_of(k), p[0]) for k, p in
                        enumerate(map(source_parts, m.source_index)) if len(p) == 1)
                copies = splits[row.space.space][c, parts[0]]
                if copies > 1:
                    origin += f" (split into {copies})"
            out.append((row.space.space, t, origin))
        return out

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
        return self.log_text()

    def log_text(self, full_report: str = "") -> str:
        """What the log shows of this report: the summary line, where the source names came
        from, the :meth:`mapping_summary`, the tensor table and what NEW_CLASS_INIT did, each
        bounded to a screen whatever the number of classes.

        Args:
            full_report: the file the full report is written to, named where rows are left out.
        """
        parts = [self.summary()]
        parts += [f"{s.space} source class names: {s.source_from}" for s in self.spaces.values()
                  if s.resolution == "map" and s.source_from]
        if any(s.resolution != "unchanged" for s in self.spaces.values()):
            parts.append(self.mapping_summary(full_report))
        if self.tensors or self.mismatches:
            parts.append(self.table())
        if self.new_classes is not None and self.new_classes.classes:
            parts.append(self.new_classes.log_text(full_report))
        return "\n".join(parts)


def _new_class_origin(init: Any) -> str:
    """``"fresh"`` (the head's init), or how NEW_CLASS_INIT started the class (its
    ``NewClassInit``), so that the mapping table agrees with the new-class table below it."""
    if init is None or init.method == "head":
        return "fresh"
    return f"new: {init.method}" + (f" (relative {init.relative})" if init.relative else "")


def _pipe_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    return tabulate(rows, headers=headers, tablefmt="pipe")
