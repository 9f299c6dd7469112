"""The init rules: a new class's relative (the source class that scores highest on its
examples), its imprinted classifier rows and their calibration, and the relative's entries
copied into every thing head. See :mod:`d2_reclass.new_classes` for the rules in words.
"""
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

from ..classes import ClassMapping
from ..entries import CLASS
from ..layouts import THING, ClassLayout, SourceAxis
from .examples import Collected, Plan
from .report import NewClassInit
from .scoring import BoxPath, Example, source_rows

__all__ = ["Classifier", "init_one", "learned_class_rows", "read_classifiers",
           "relative_entries"]


class Classifier(NamedTuple):
    """One box classifier as imprinting reads it, the same for every new class (read once per
    load, not once per class: with the kept-class calibration, that was a pass over every
    reference box per class, quadratic in the examples read)."""

    weight: torch.Tensor  # (K + 1, D) float64, the model's rows
    bias: torch.Tensor  # (K + 1,) float64
    sigmoid: bool
    competitors: List[int]  # the kept classes and background
    scale: Optional[float]  # the kept classes' mean row norm, when there are reference boxes
    target: Optional[float]  # their median log-odds against the competitors
    # The kept-class objects read (reference boxes and negatives): their box features (N, D)
    # and the highest logit among the competitors other than each one's own class (N,), where
    # there are any: what caps an imprinted row's bias (_object_cap).
    objects: Optional[Tuple[torch.Tensor, torch.Tensor]]
    # The same objects as every new class's direction is contrasted with them (_direction).
    contrast: Optional["Contrast"] = None


def read_classifiers(paths: List[BoxPath], reference: List[Example], kept: List[int],
                     model_state: Mapping[str, torch.Tensor],
                     negatives: Sequence[Example] = ()) -> Dict[str, Classifier]:
    """Per box path (prefix), its :class:`Classifier`, calibrated on ``reference`` (the
    kept-class examples) where it has any; ``reference`` and ``negatives`` (kept-class objects
    the model detects, unlabelled) are the kept-class objects its rows are contrasted with."""
    out = {}
    for path in paths:
        weight = model_state[path.prefix + "cls_score.weight"].double().cpu()
        bias = model_state[path.prefix + "cls_score.bias"].double().cpu()
        sigmoid = bool(getattr(path.predictor, "use_sigmoid_ce", False))
        competitors = kept + [weight.shape[0] - 1]
        ref = [e for e in reference if path.prefix in e.features]
        scale = target = None
        if ref:
            scale = float(weight[kept].norm(dim=1).mean())
            ref_x = torch.stack([e.features[path.prefix] for e in ref]).double()
            labels = torch.tensor([e.target for e in ref])
            target = float(_log_odds(ref_x @ weight.T + bias, labels, competitors,
                                     sigmoid).median())
        objects = None
        kept_objects = ref + [e for e in negatives if path.prefix in e.features]
        if kept_objects:
            x = torch.stack([e.features[path.prefix] for e in kept_objects]).double()
            labels = torch.tensor([e.target for e in kept_objects])
            objects = (x, _others(x @ weight.T + bias, labels, competitors).max(dim=1).values)
        out[path.prefix] = Classifier(weight, bias, sigmoid, competitors, scale, target,
                                      objects, None if objects is None else Contrast(objects[0]))
    return out


def init_one(t: int, mapping: ClassMapping, plan: Plan, collected: Collected,
              paths: List[BoxPath], classifiers: Mapping[str, Classifier], source_state,
              method: str) -> Tuple[NewClassInit, Dict[str, Tuple[torch.Tensor, float]]]:
    """How new class ``t`` is initialised, and its imprinted (row, bias) per classifier
    (``classifiers``: :func:`read_classifiers` of ``paths``)."""
    name = mapping.target[t]
    if t in plan.notes:
        return NewClassInit(name, t, "head", reason=plan.notes[t]), {}
    picks = plan.chosen[t]
    bad = [collected.unreadable[i] for i in picks if i in collected.unreadable]
    examples = collected.by_class.get(t, [])
    init = NewClassInit(name, t, "head", images=len(picks) - len(bad),
                        instances=len(examples), unreadable=bad)
    if not examples:
        init.reason = (f"none of its {len(picks)} chosen images could be read (first: "
                       f"{bad[0]}); head init")
        return init, {}
    scored = [e.source_probs for e in examples if e.source_probs is not None]
    if not scored:
        init.reason = ("the model has no box or dense classifier with the checkpoint's class "
                       "rows to score its examples; head init")
        return init, {}
    mean = torch.stack(scored).mean(dim=0)
    r = int(mean.argmax())
    init.method, init.relative, init.relative_index = "relative", mapping.source_name(r), r
    init.score = float(mean[r])
    if method != "imprint":
        return init, {}
    if not paths:
        init.reason = ("no box classifier to imprint (RetinaNet/FCOS classify per location); "
                       "all entries from the relative")
        return init, {}
    rows: Dict[str, Tuple[torch.Tensor, float]] = {}
    notes = []
    for path in paths:
        feats = torch.stack([e.features[path.prefix] for e in examples])
        row, bias, info, note = _imprint(path, feats, classifiers[path.prefix], source_state,
                                         mapping.num_source)
        if row is None:
            notes.append(f"{path.prefix[:-1]}: {note}; its row from the relative")
            continue
        rows[path.prefix] = (row, bias)
        init.imprint[path.prefix[:-1]] = info
        if note not in notes:
            notes.append(note)
    if rows:
        init.method = "imprint"
    init.reason = "; ".join(notes)
    return init, rows


def _log_odds(logits: torch.Tensor, classes: torch.Tensor, competitors: List[int],
              sigmoid: bool) -> torch.Tensor:
    """Per row, the log-odds of class ``classes[i]`` against ``competitors`` (itself left
    out): what decides its softmax probability; the logit itself for a sigmoid classifier."""
    own = logits.gather(1, classes[:, None])[:, 0]
    if sigmoid:
        return own
    return own - torch.logsumexp(_others(logits, classes, competitors), dim=1)


def _others(logits: torch.Tensor, classes: torch.Tensor, competitors: List[int]) -> torch.Tensor:
    """(R, len(competitors)): each row's logits of ``competitors``, -inf at its own class
    ``classes[i]``."""
    itself = classes[:, None] == torch.tensor(competitors, device=classes.device)[None, :]
    return logits[:, competitors].masked_fill(itself, float("-inf"))


def _imprint(path: BoxPath, new_feats: torch.Tensor, classifier: Classifier,
             source_state: Mapping[str, torch.Tensor], num_source: int):
    """One new class's imprinted row in one classifier (see the module docstring), its bias
    capped by the classifier's negatives (:func:`_negative_cap`).

    Returns:
        (row (D,) or None, bias or None, numbers for the report, note): None when the row
        cannot be defined (the note says why).
    """
    x = new_feats.double()
    mean = x.mean(dim=0)
    norm = float(mean.norm())
    if not norm > 0:
        return None, None, {}, "its box features are all zero"
    direction = _direction(x, classifier.contrast)
    weight, bias, sigmoid = classifier.weight, classifier.bias, classifier.sigmoid
    competitors = classifier.competitors
    if classifier.target is not None:
        scale, target = classifier.scale, classifier.target
        note = "calibrated on the kept classes"
    else:
        rows = source_rows(source_state, path.prefix, num_source + 1, x.shape[1])
        if rows is None:
            return None, None, {}, "no kept class to calibrate against and no source rows"
        src_w, src_b = rows[0].double().cpu(), rows[1].double().cpu()
        scale = float(src_w[:num_source].norm(dim=1).mean())
        logits = x @ src_w.T + src_b
        top = logits[:, :num_source].argmax(dim=1)
        target = float(_log_odds(logits, top, list(range(num_source + 1)), sigmoid).median())
        note = "calibrated on the source classes (no kept-class example)"
    rest = torch.zeros(len(x), dtype=torch.float64) if sigmoid else torch.logsumexp(
        (x @ weight.T + bias)[:, competitors], dim=1)
    # The new class's log-odds on example i is scale * direction . x_i + b - rest_i: linear in
    # b, so the b that puts its median at the reference is exact.
    b = target - float((scale * (x @ direction) - rest).median())
    info = {"scale": scale, "bias": b, "reference_log_odds": target, "mean_feature_norm": norm}
    if classifier.objects is not None:
        n = len(classifier.objects[0])
        note += f"; its direction contrasted with {n} kept-class objects"
        cap = _object_cap(scale * direction, classifier.objects)
        if cap < b:
            info.update(bias=cap, calibrated_bias=b, kept_objects=n)
            b = cap
            note += "; bias lowered to rank below the runner-up on each of them"
    return scale * direction, b, info, note


def _direction(new: torch.Tensor, kept: Optional["Contrast"]) -> torch.Tensor:
    """The unit direction of an imprinted row: Fisher's discriminant of the new class's box
    features ``new`` (R, D) against the kept-class objects of ``kept``, with the covariance
    shrunk as Ledoit and Wolf estimate it; the new class's mean feature itself when there is
    nothing to contrast with.

    Box-head features share a large component among all objects (post-ReLU activations of
    "some object here"): a row along the new class's mean scores a look-alike kept object
    (a diamond for a star) almost as high as the new class's own, and takes its detections
    from iteration 0. The discriminant is the direction that separates the two groups
    relative to how they spread; a few dozen examples cannot estimate a D x D covariance, so
    it is shrunk towards a multiple of the identity by the amount the data's own variability
    calls for (no constant is chosen here).
    """
    mean = new.mean(dim=0)
    if kept is not None:
        w = kept.solve(new - mean, mean - kept.mean)
        norm = float(w.norm()) if w is not None else 0.0
        if norm > 0 and torch.isfinite(w).all():
            return w / norm
    return mean / float(mean.norm())


class Contrast:
    """The kept-class objects (N, D) every new class's discriminant is contrasted with, and
    what all those solves share.

    :meth:`solve` is ``S^-1 v`` for the Ledoit-Wolf shrunk covariance ``S = (1 - a) X'X / n +
    a m I`` of the centred rows ``X`` = the new class's (R, given per call) and these objects'
    (m: the mean variance, a: the estimated shrinkage). With fewer rows than feature
    dimensions it goes through the n x n Gram matrix (Woodbury), whose cost does not grow with
    D squared; with more, through one eigendecomposition of the objects' D x D scatter, made
    once and shared by every class, then a rank-R update per class, so that many classes
    times many objects stays linear in the classes (one n x n solve per class was cubic in
    the objects read).
    """

    def __init__(self, kept: torch.Tensor):
        self.mean = kept.mean(dim=0)
        self.centred = kept - self.mean
        self._scatter: Optional[Tuple[torch.Tensor, torch.Tensor, float, float, float]] = None

    def solve(self, new_centred: torch.Tensor, v: torch.Tensor) -> Optional[torch.Tensor]:
        """``S^-1 v`` (see the class doc), or None when S is singular (all rows equal)."""
        q = self.centred
        if len(new_centred) + len(q) <= q.shape[1]:
            return _shrunk_solve(torch.cat([new_centred, q]), v)
        return self._solve_shared(new_centred, v)

    def _shared(self) -> Tuple[torch.Tensor, torch.Tensor, float, float, float]:
        """Once: the eigenvectors and values of Q'Q, |Q|_F^2, |Q'Q|_F^2, sum_j |q_j|^4."""
        if self._scatter is None:
            q = self.centred
            lam, vec = torch.linalg.eigh(q.T @ q)
            lam = lam.clamp(min=0)
            sq = (q * q).sum(dim=1)
            self._scatter = (vec, lam, float(sq.sum()), float((lam ** 2).sum()),
                             float((sq ** 2).sum()))
        return self._scatter

    def _solve_shared(self, p: torch.Tensor, v: torch.Tensor) -> Optional[torch.Tensor]:
        vec, lam, q_sq, qq_f2, q_four = self._shared()
        q = self.centred
        n, d = len(p) + len(q), q.shape[1]
        p_sq = (p * p).sum(dim=1)
        # The Gram matrix of all rows, [[PP', PQ'], [QP', QQ']], by its blocks.
        g_f2 = float(((p @ p.T) ** 2).sum() + 2 * ((p @ q.T) ** 2).sum()) + qq_f2
        m = (float(p_sq.sum()) + q_sq) / (n * d)
        s_sq = g_f2 / n ** 2
        d2 = s_sq - m * m * d
        b2 = (float((p_sq ** 2).sum()) + q_four - n * s_sq) / n ** 2
        shrunk = _shrinkage(n, m, d2, b2)
        if shrunk is None:
            return None
        c, beta = shrunk

        def base_inverse(y: torch.Tensor) -> torch.Tensor:  # (c I + beta Q'Q)^-1 y
            return vec @ ((vec.T @ y) / (c + beta * lam)[:, None])

        u = base_inverse(v[:, None])
        if not len(p) or beta == 0:
            return u[:, 0]
        z = base_inverse(p.T)
        inner = torch.eye(len(p), dtype=p.dtype) / beta + p @ z
        return (u - z @ torch.linalg.solve(inner, p @ u))[:, 0]


def _shrunk_solve(x: torch.Tensor, v: torch.Tensor) -> Optional[torch.Tensor]:
    """``S^-1 v`` for the Ledoit-Wolf shrunk covariance ``S = (1 - a) X'X / n + a m I`` of the
    centred rows ``x`` (n, D) (m: the mean variance, a: the estimated shrinkage), or None when
    it is singular (all rows equal). Through the n x n Gram matrix (Woodbury): the cost does
    not grow with D squared."""
    n, d = x.shape
    gram = x @ x.T
    m = float(gram.trace()) / (n * d)
    s_sq = float((gram ** 2).sum()) / n ** 2  # |S|_F^2 of S = X'X / n
    d2 = s_sq - m * m * d  # |S - m I|_F^2
    # The mean over rows of |x_k x_k' - S|_F^2, divided by n (Ledoit and Wolf's b^2).
    b2 = float((gram.diagonal() ** 2 - 2 * (gram ** 2).sum(dim=1) / n + s_sq).sum()) / n ** 2
    shrunk = _shrinkage(n, m, d2, b2)
    if shrunk is None:
        return None
    c, beta = shrunk
    inner = torch.linalg.solve(c * torch.eye(n, dtype=x.dtype) + beta * gram, x @ v)
    return (v - beta * (x.T @ inner)) / c


def _shrinkage(n: int, m: float, d2: float, b2: float) -> Optional[Tuple[float, float]]:
    """Ledoit and Wolf's ``S = (1 - a) X'X / n + a m I`` of n rows written ``c I + beta X'X``:
    (c, beta), from the mean variance m, ``d2 = |X'X / n - m I|_F^2`` and their ``b2``; None
    when S is singular (all rows equal)."""
    if not (m > 0 and d2 > 0):
        return None
    a = min(b2, d2) / d2
    c, beta = a * m, (1 - a) / n
    return (c, beta) if c > 0 else None


def _object_cap(row: torch.Tensor, objects: Tuple[torch.Tensor, torch.Tensor]) -> float:
    """The highest bias at which the new row's logit, ``row . x + b``, stays at most the
    runner-up's (the highest competitor but the object's own class) on every kept-class
    object x read.

    A new row that reaches a kept object's own logit halves that class's probability there;
    below the runner-up, it takes no more than the classes the model already weighs against
    it, so the kept classes' scores, and their order, hardly move from iteration 0. On every
    object, not a median: one object lost is one detection less.
    """
    x, runner_up = objects
    return float((runner_up - x @ row).min())


def relative_entries(model_state: Mapping[str, torch.Tensor],
                      source_state: Mapping[str, torch.Tensor], layouts: Sequence[ClassLayout],
                      mapping: ClassMapping, relatives: Dict[int, int]) -> Dict[str, torch.Tensor]:
    """Every thing tensor with each new class's entries copied from its relative's, the
    engine's layouts placing them; every other entry is the model's own, bit for bit."""
    if not relatives:
        return {}
    index = list(mapping.source_index)
    for t, r in relatives.items():
        index[t] = r
    by_key: Dict[str, List[ClassLayout]] = {}
    for lay in layouts:
        if learned_class_rows(lay):
            by_key.setdefault(lay.key, []).append(lay)
    out: Dict[str, torch.Tensor] = {}
    for key, lays in by_key.items():
        src, own = source_state.get(key), model_state.get(key)
        if src is not None and own is not None:
            value = _copy_relatives(src, own, lays, index, mapping.num_source, list(relatives))
            if value is not None:
                out[key] = value
    return out


def learned_class_rows(lay: ClassLayout) -> bool:
    """``lay`` holds learned entries per thing class (not a vocabulary, buffer or agnostic)."""
    return lay.space == THING and not (lay.keep_model or lay.vocabulary or lay.agnostic)


def _copy_relatives(src: torch.Tensor, own: torch.Tensor, lays: List[ClassLayout],
                    index: List[Optional[int]], num_source: int,
                    new: List[int]) -> Optional[torch.Tensor]:
    """``own`` with the entries of classes ``new`` (on every class axis) gathered from
    ``src`` through ``index``; None when ``src`` does not read as ``num_source`` classes
    (it differs for other reasons, and the engine skipped it too).

    The engine's own layouts place every entry (:meth:`ClassLayout.entry_sources`): an entry is
    taken from ``src`` when it belongs to a new class on some class axis and is a plain copy of
    one source entry on every class axis.
    """
    axes = {lay.axis for lay in lays}
    if src.dim() != own.dim() or any(
            src.shape[d] != own.shape[d] for d in range(own.dim()) if d not in axes):
        return None
    only_new = [index[t] if t in new else None for t in range(len(index))]
    gathered = src
    copy = torch.ones(own.shape, dtype=torch.bool)
    of_new = torch.zeros(own.shape, dtype=torch.bool)
    for lay in sorted(lays, key=lambda lay: lay.axis):
        n = src.shape[lay.axis]
        src_agnostic = lay.is_agnostic_length(n) and not (lay.count_classes(n) == num_source == 1)
        if not src_agnostic and lay.count_classes(n) != num_source:
            return None
        axis = [SourceAxis(num_source, src_agnostic)]
        every = lay.entry_sources(index, axis)
        new_entries = lay.entry_sources(only_new, axis)
        positions = torch.where(every.copies, every.index[0], -1)
        gathered = gathered.index_select(lay.axis, positions.clamp(min=0).to(src.device))
        shape = [1] * own.dim()
        shape[lay.axis] = -1
        copy &= (positions >= 0).view(shape)
        of_new |= ((new_entries.kind == CLASS) & new_entries.copies).view(shape)
    return torch.where((copy & of_new).to(own.device), gathered.to(own), own)
