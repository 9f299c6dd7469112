"""What NEW_CLASS_INIT did, per new class: the method it got, its relative, the images read."""
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from tabulate import tabulate

from ..engine.report import FIRST_ROWS, FULL_TABLE_ROWS

__all__ = ["NewClassInit", "NewClassReport"]


@dataclass
class NewClassInit:
    """How one new class was initialised.

    Attributes:
        name (str), index (int): the target class and its index.
        method (str): what it got: ``imprint``, ``relative`` or ``head`` (a fallback).
        relative (str or None), relative_index (int or None): the source class its entries
            (all of them for ``relative``, those not imprinted for ``imprint``) come from.
        score (float or None): the relative's mean probability on the class's examples.
        images (int): images read for it; instances (int): its boxes used.
        unreadable (list[str]): chosen images that could not be read (skipped).
        reason (str): why it fell back, or how it was calibrated.
        imprint (dict): per classifier (state-dict prefix): scale, bias, reference log-odds,
            mean feature norm; where the bias was lowered below the runner-up on the kept-class
            objects, also calibrated_bias and kept_objects (how many).
    """

    name: str
    index: int
    method: str
    relative: Optional[str] = None
    relative_index: Optional[int] = None
    score: Optional[float] = None
    images: int = 0
    instances: int = 0
    unreadable: List[str] = field(default_factory=list)
    reason: str = ""
    imprint: Dict[str, Dict[str, float]] = field(default_factory=dict)


@dataclass
class NewClassReport:
    """What NEW_CLASS_INIT did: per new class, the changed tensors, and what it cost.

    Attributes:
        method (str): the requested method.
        max_images (int), seed (int): the options it ran with.
        classes (list[NewClassInit]): one per new class.
        changed (list[str]): state-dict keys whose new-class entries changed.
        images_read (int): distinct images read (each once, whatever the classes it serves).
        seconds (float): total time, dataset loading included.
        seconds_dataset (float): of which loading the dataset dicts.
        seconds_per_image (float): reading, transforming and running one image, on average.
    """

    method: str
    max_images: int
    seed: int
    classes: List[NewClassInit] = field(default_factory=list)
    changed: List[str] = field(default_factory=list)
    images_read: int = 0
    seconds: float = 0.0
    seconds_dataset: float = 0.0
    seconds_per_image: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self, classes: Optional[List[NewClassInit]] = None) -> str:
        """One row per new class (of ``classes``; default: every one)."""
        rows = [(c.name, c.method, "" if c.relative is None else c.relative,
                 "" if c.score is None else f"{c.score:.3f}", c.images, c.instances, c.reason)
                for c in (self.classes if classes is None else classes)]
        return tabulate(rows, headers=["new class", "init", "relative", "score", "images",
                                       "boxes", "note"], tablefmt="pipe")

    def __str__(self) -> str:
        return self.log_text()

    def log_text(self, full_report: str = "") -> str:
        """The cost line and the table of the new classes; past ``FULL_TABLE_ROWS`` classes,
        how many got each init and the first ``FIRST_ROWS`` of each, the rest in
        ``full_report`` (the ``new_classes`` of ``reclass_report.json``) when named."""
        count = len(self.classes)
        head = (f"NEW_CLASS_INIT {self.method}: {count} new class{'es' if count != 1 else ''}, "
                f"{self.images_read} images read in {self.seconds:.2f} s "
                f"({self.seconds_per_image:.3f} s per image, {self.seconds_dataset:.2f} s "
                f"loading the dataset dicts)")
        if count <= FULL_TABLE_ROWS:
            return f"{head}\n{self.table()}"
        by_method: Dict[str, List[NewClassInit]] = {}
        for c in self.classes:
            by_method.setdefault(c.method, []).append(c)
        where = (f"every class in {full_report} (new_classes)" if full_report
                 else "every class: NewClassReport.table()")
        return (f"{head}; " + ", ".join(f"{len(cs)} {m}" for m, cs in by_method.items())
                + f"\nThe first {FIRST_ROWS} classes of each init ({where}):\n"
                + self.table([c for cs in by_method.values() for c in cs[:FIRST_ROWS]]))
