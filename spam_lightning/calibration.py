"""The operating point: temperature scaling fitted on the validation set (Guo et al. 2017), the
expected calibration error (ECE) before and after it, and a decision threshold on the positive
class (index 1, "spam") for a target validation false-positive rate. Training fits them
(``training/callbacks/calibration.py``); the bundle stores them; ``spam-classify``,
``Classifier`` and ``spam-serve`` apply them (``apply`` and ``decide`` below). torch only: the
inference side never imports Lightning."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

POSITIVE = 1  # the positive class of a threshold: class index 1 ("spam" in SMS spam)
DEFAULT_BINS = 15  # ECE bins (equal width over the top-label confidence), as Guo et al.
TEMPERATURE_RANGE = (0.01, 100.0)  # a fit at the edge (e.g. a separable validation set) stops here


def log_probs(probs: torch.Tensor) -> torch.Tensor:
    """``log p`` in float64: logits up to a per-row constant, so ``softmax(log p / T)`` is
    ``softmax(logits / T)``. A probability that underflowed to 0 counts as the smallest float32."""
    return probs.double().clamp_min(torch.finfo(torch.float32).tiny).log()


def apply(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``probs`` with the temperature applied (same dtype); temperature 1: ``probs`` themselves."""
    if temperature == 1.0:
        return probs
    return torch.softmax(log_probs(probs) / temperature, dim=-1).to(probs.dtype)


def fit_temperature(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature that minimizes the negative log-likelihood of ``labels`` under
    ``softmax(log probs / T)``: L-BFGS on ``log T`` (the NLL is convex in ``1 / T``), clamped to
    ``TEMPERATURE_RANGE``. No labelled rows: 1."""
    keep = labels >= 0
    if not bool(keep.any()):
        return 1.0
    low, high = (math.log(v) for v in TEMPERATURE_RANGE)
    # the final test loop runs in inference mode: autograd on ordinary copies of its tensors
    with torch.inference_mode(False), torch.enable_grad():
        z, y = log_probs(probs[keep]).clone(), labels[keep].long().clone()
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(z / log_t.clamp(low, high).exp(), y)
            loss.backward()
            return loss

        optimizer.step(closure)
    value = float(log_t.detach().clamp(low, high).exp())
    return value if math.isfinite(value) else 1.0


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = DEFAULT_BINS) -> float:
    """Expected calibration error of the top-label confidence: ``bins`` equal-width bins, each
    |accuracy - mean confidence| weighted by its share of messages (torchmetrics, L1 norm)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    if len(labels) == 0:
        return float("nan")
    return float(multiclass_calibration_error(probs.float(), labels.long(), probs.shape[1],
                                              n_bins=bins, norm="l1"))


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = DEFAULT_BINS
                ) -> dict[str, list[float]]:
    """Per confidence bin: its centre, mean confidence, accuracy and message count (empty bins
    have count 0 and NaN means): the reliability diagram's bars."""
    conf, pred = probs.float().max(dim=1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    which = (torch.bucketize(conf, edges[1:-1], right=True)).clamp(0, bins - 1)
    count = torch.bincount(which, minlength=bins).float()
    mean = lambda v: (torch.bincount(which, v, minlength=bins) / count).tolist()  # noqa: E731
    return {"centre": ((edges[:-1] + edges[1:]) / 2).tolist(), "confidence": mean(conf),
            "accuracy": mean(correct), "count": count.tolist()}


def choose_threshold(p_positive: torch.Tensor, labels: torch.Tensor, max_fpr: float) -> float | None:
    """The lowest threshold on ``P(positive)`` whose validation false-positive rate is at most
    ``max_fpr`` (the most recall for that rate): with ``k = floor(max_fpr * negatives)`` false
    positives allowed, it lies halfway between the (k+1)-th highest negative score and the next
    higher validation score (or 1). None: no negative to measure a rate on."""
    scores = p_positive.double()
    negatives = scores[labels != POSITIVE].sort(descending=True).values
    if len(negatives) == 0:
        return None
    k = math.floor(max_fpr * len(negatives) + 1e-9)
    if k >= len(negatives):
        return 0.0
    edge = float(negatives[k])
    above = scores[scores > edge]
    return (edge + (float(above.min()) if len(above) else 1.0)) / 2


def decide(probs: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Predicted class per row: ``P(positive) >= threshold`` for two classes, else the argmax."""
    if threshold is None:
        return probs.argmax(dim=1)
    return (probs[:, POSITIVE] >= threshold).long()


def binary_rates(pred: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, precision, recall and false-positive rate of the positive class (0 where a
    denominator is 0)."""
    pos, neg = labels == POSITIVE, labels != POSITIVE
    tp, fp = int((pred[pos] == POSITIVE).sum()), int((pred[neg] == POSITIVE).sum())
    ratio = lambda a, b: a / b if b else 0.0  # noqa: E731
    return {"accuracy": ratio(int((pred == labels).sum()), len(labels)),
            "precision": ratio(tp, tp + fp), "recall": ratio(tp, int(pos.sum())),
            "fpr": ratio(fp, int(neg.sum()))}


def threshold_problems(max_fpr: Any, num_classes: int | None) -> list[str]:
    """``threshold.max_fpr``: null, or a number in [0, 1) on a two-class task."""
    if max_fpr is None:
        return []
    if isinstance(max_fpr, bool) or not isinstance(max_fpr, int | float) or not 0 <= max_fpr < 1:
        return [f"threshold.max_fpr={max_fpr!r}: a false-positive rate in [0, 1) such as 0.01, or "
                "null for the argmax (the book)"]
    if num_classes is not None and num_classes != 2:
        return [f"threshold.max_fpr={max_fpr}: a threshold needs two classes (class 1 is the "
                f"positive one); this data has {num_classes}. Use threshold.max_fpr=null"]
    return []


def config_problems(cfg: Any, num_classes: int | None) -> list[str]:
    """The ``calibration`` and ``threshold`` options of a run config, one line per problem."""
    from omegaconf import OmegaConf

    from spam_lightning.rules import bool_problems, is_int

    bins = OmegaConf.select(cfg, "calibration.bins", default=DEFAULT_BINS)
    problems = bool_problems(**{"calibration.temperature": OmegaConf.select(
        cfg, "calibration.temperature", default=True)})
    if not is_int(bins, 1):
        problems.append(f"calibration.bins={bins!r}: the number of ECE bins, an integer >= 1 (15)")
    return problems + threshold_problems(OmegaConf.select(cfg, "threshold.max_fpr"), num_classes)


@dataclass
class OperatingPoint:
    """What a bundle stores (``bundle.json``'s ``operating_point``) and inference applies."""

    temperature: float = 1.0
    threshold: float | None = None  # None: argmax
    max_fpr: float | None = None  # the target it was chosen for (a record)

    def as_json(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "threshold": self.threshold,
                "positive_class": POSITIVE, "max_fpr": self.max_fpr}

    @classmethod
    def from_bundle(cls, config: dict[str, Any], where: str = "bundle.json") -> OperatingPoint:
        """A bundle's operating point; older bundles and baselines have none: temperature 1, argmax.
        A bad value is ``ValueError`` naming the field."""
        op = config.get("operating_point")
        if op is None:
            return cls()
        if not isinstance(op, dict):
            raise ValueError(f"{where}: operating_point is {type(op).__name__}; it must be an object "
                             "(temperature, threshold); re-create the bundle.")
        t, threshold = op.get("temperature", 1.0), op.get("threshold")
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"{where}: operating_point.temperature is {t!r}; it must be a number > 0.")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)
                                      or not 0 <= threshold <= 1):
            raise ValueError(f"{where}: operating_point.threshold is {threshold!r}; it must be a "
                             "probability in [0, 1] or null (argmax).")
        if threshold is not None and config.get("num_classes") != 2:
            raise ValueError(f"{where}: operating_point.threshold needs two classes; this bundle has "
                             f"{config.get('num_classes')}.")
        return cls(float(t), None if threshold is None else float(threshold), op.get("max_fpr"))


def fit(val_probs: torch.Tensor, val_labels: torch.Tensor, test_probs: torch.Tensor | None,
        test_labels: torch.Tensor | None, *, max_fpr: float | None = None, temperature: bool = True,
        bins: int = DEFAULT_BINS) -> tuple[OperatingPoint, dict[str, Any]]:
    """The operating point from the validation split and metrics.json's keys: ``temperature``,
    ``{val,test}_ece`` and ``..._ece_calibrated``, ``threshold`` (null: argmax) and, for two
    classes, ``test_{precision,recall,fpr}_op`` at that threshold (calibrated probabilities)."""
    t = fit_temperature(val_probs, val_labels) if temperature else 1.0
    metrics: dict[str, Any] = {"temperature": t}
    splits = {"val": (val_probs, val_labels)}
    if test_probs is not None and test_labels is not None:
        splits["test"] = (test_probs, test_labels)
    for split, (probs, labels) in splits.items():
        metrics[f"{split}_ece"] = ece(probs, labels, bins)
        metrics[f"{split}_ece_calibrated"] = ece(apply(probs, t), labels, bins)
    threshold = None
    binary = val_probs.shape[1] == 2
    if binary and max_fpr is not None:
        threshold = choose_threshold(apply(val_probs, t)[:, POSITIVE], val_labels, max_fpr)
    metrics["threshold"] = threshold
    if binary:
        for split, (probs, labels) in splits.items():
            rates = binary_rates(decide(apply(probs, t), threshold), labels)
            metrics.update({f"{split}_{k}_op": v for k, v in rates.items()})
    return OperatingPoint(t, threshold, max_fpr), metrics
