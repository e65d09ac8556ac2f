"""The one scoring core: a query against a labelled support set, leave-one-out, and the temperature fit.

System 1 (`fast_path`, and the knowledge base's fusion fit) and the visual re-ranker (`reranker`) score the
same way, on different descriptors:

    s_proto    = q @ P^T                       cosine to each class's L2-normalised mean
    s_exemplar = max over the class's exemplars of q @ E^T    (one scatter-reduce, no loop over classes)
    s_img      = (1 - e) * s_proto + e * s_exemplar           e: the exemplar weight

Leave-one-out (`Support.loo_parts`) scores each support descriptor against the set without itself: its
own class's mean is (sum - x) re-normalised, and it is never its own best exemplar. A class whose only
exemplar is x has no image evidence left: its own score is -1, the lowest cosine (callers leave such rows
out of any fit: `Support.usable`).

`fit_temperature` picks the temperature minimising the mean negative log-likelihood of the true class on
one log-spaced grid (`TEMPERATURES`), the calibration both System 1's fusion and the re-ranker use.
"""

from __future__ import annotations

import math

import torch

# One temperature grid for every softmax fitted on the support set: 0.001 .. 1, log-spaced, 41 points.
TEMPERATURES = tuple(10 ** (-3 + 3 * i / 40) for i in range(41))


def best_exemplar_scores(sims: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, N) query-exemplar similarities -> (B, C) best exemplar per class; -inf where a class has none."""
    out = torch.full((sims.shape[0], num_classes), -math.inf, dtype=sims.dtype, device=sims.device)
    index = labels.to(sims.device).long().unsqueeze(0).expand_as(sims)
    return out.scatter_reduce_(1, index, sims, reduce="amax", include_self=True)


def mix(s_proto: torch.Tensor, s_exemplar: torch.Tensor, exemplar_weight: float) -> torch.Tensor:
    """(1 - e) * s_proto + e * s_exemplar; a class without exemplars (-inf) keeps its prototype score."""
    s_exemplar = torch.where(torch.isinf(s_exemplar), s_proto, s_exemplar)
    return (1 - exemplar_weight) * s_proto + exemplar_weight * s_exemplar


def image_scores(queries: torch.Tensor, prototypes: torch.Tensor, exemplars: torch.Tensor | None,
                 labels: torch.Tensor | None, exemplar_weight: float) -> torch.Tensor:
    """(B, D) queries -> (B, C) scores: prototypes mixed with the best exemplar (see the module docstring)."""
    s_proto = queries @ prototypes.T
    if exemplar_weight <= 0 or exemplars is None or exemplars.shape[0] == 0:
        return s_proto
    s_ex = best_exemplar_scores(queries @ exemplars.T, labels, prototypes.shape[0])
    return mix(s_proto, s_ex, exemplar_weight)


class Support:
    """A labelled support set of L2-normalised descriptors (N, D), with its class sums and prototypes."""

    def __init__(self, exemplars: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
        self.exemplars = exemplars
        self.labels = labels.to(exemplars.device).long()
        self.num_classes = num_classes
        self.sums = torch.zeros(num_classes, exemplars.shape[1], dtype=exemplars.dtype,
                                device=exemplars.device).index_add_(0, self.labels, exemplars)
        self.counts = torch.bincount(self.labels, minlength=num_classes)
        self.prototypes = torch.nn.functional.normalize(self.sums, dim=1)

    @property
    def usable(self) -> torch.Tensor:
        """(N,) bool: exemplars whose class has another one, so leave-one-out can score them fairly."""
        return self.counts[self.labels] > 1

    def loo_parts(self, start: int = 0, stop: int | None = None,
                  exemplar: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(s_proto, s_exemplar or None), each (n, C), for exemplars[start:stop] left out of the set."""
        q = self.exemplars[start:stop]
        lab = self.labels[start:stop]
        rows = torch.arange(q.shape[0], device=q.device)
        s_proto = q @ self.prototypes.T
        own = self.sums[lab] - q  # the own class's sum without this image
        own_n = own.norm(dim=1)
        s_proto[rows, lab] = torch.where((self.counts[lab] > 1) & (own_n > 0),
                                         (q * own).sum(1) / own_n.clamp_min(1e-12), torch.full_like(own_n, -1.0))
        if not exemplar:
            return s_proto, None
        sims = q @ self.exemplars.T
        sims[rows, rows + start] = -math.inf
        return s_proto, best_exemplar_scores(sims, self.labels, self.num_classes)


def nll_per_row(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N,) float64 -log softmax(logits / t)[true], computed as `fit_temperature` explains (no rounding to 0)."""
    logits = logits.double()
    y = labels.long().view(-1, 1)
    margins = logits - logits.gather(1, y)
    margins.scatter_(1, y, -math.inf)  # the true class itself is the "1" in log(1 + ...)
    return torch.nn.functional.softplus(torch.logsumexp(margins / temperature, dim=1))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor,
                    temperatures: tuple[float, ...] = TEMPERATURES) -> tuple[float, float]:
    """(temperature, mean NLL): the grid point where softmax(logits / t) gives the true class the highest
    mean log-likelihood (the first, where several tie).

    Computed in float64 as softplus(logsumexp of the other classes' margins): -log p_true = log(1 + sum over
    c != true of exp((s_c - s_true) / t)). Written as logsumexp(all) - s_true it rounds to exactly 0 once
    every margin exceeds ~37 t, and well-separated choices would tie at 0 instead of being told apart.
    """
    best: tuple[float, float] | None = None
    for t in temperatures:
        nll = float(nll_per_row(logits, labels, t).mean())
        if best is None or nll < best[1] - 1e-12:
            best = (t, nll)
    return best
