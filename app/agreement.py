"""How far models agree on one image: consensus top-1, top-k overlap, Jensen-Shannon divergence."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ModelOutput:
    name: str
    probs: np.ndarray  # full softmax, (classes,)
    labels: Sequence[str]
    label_set: int  # models agree only where this matches
    top_k: int


def top_indices(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest probabilities, highest first (ties by lower index)."""
    k = min(k, probs.shape[0])
    order = np.lexsort((np.arange(probs.shape[0]), -probs))
    return order[:k]


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (base 2): 0 for equal outputs, 1 for disjoint ones."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p = p / p.sum()
    q = q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / m[mask])))

    return float(min(1.0, max(0.0, 0.5 * kl(p) + 0.5 * kl(q))))


def jaccard(a: Iterable[int], b: Iterable[int]) -> float:
    sa, sb = set(int(i) for i in a), set(int(i) for i in b)
    union = sa | sb
    return len(sa & sb) / len(union) if union else 1.0


def agreement(outputs: Sequence[ModelOutput]) -> dict[str, object]:
    """Consensus top-1 within the largest group of models sharing a label set, and pairwise
    metrics between every two models that share one."""
    groups: dict[int, list[ModelOutput]] = {}
    for o in outputs:
        groups.setdefault(o.label_set, []).append(o)
    consensus = None
    best_key: tuple[int, int] | None = None
    for group in groups.values():  # the largest group; among equals, the most votes; then first
        tops = [int(top_indices(o.probs, 1)[0]) for o in group]
        votes = Counter(tops)
        most = max(votes.values())
        if best_key is not None and (len(group), most) <= best_key:
            continue
        best_key = (len(group), most)
        index = next(t for t in tops if votes[t] == most)  # ties: the earliest-asked model's
        consensus = {
            "label": group[0].labels[index],
            "index": index,
            "votes": most,
            "of": len(group),
        }
    pairwise = []
    for a, b in itertools.combinations(outputs, 2):
        if a.label_set != b.label_set:
            continue
        ta, tb = top_indices(a.probs, a.top_k).tolist(), top_indices(b.probs, b.top_k).tolist()
        pairwise.append(
            {
                "a": a.name,
                "b": b.name,
                "top1_same": bool(ta[0] == tb[0]),
                "topk_overlap": round(jaccard(ta, tb), 6),
                "js_divergence": round(js_divergence(a.probs, b.probs), 6),
            }
        )
    return {"top1_consensus": consensus, "pairwise": pairwise}
