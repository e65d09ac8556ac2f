"""`fgvr compare RUN_A RUN_B`: is the difference between two evaluations real?

Both runs must have scored the same images (same resolved paths, same labels): a paired comparison over
different image sets would compare the sets, not the systems, so it is refused with the images that
differ. On the shared images: accuracy of each, the paired difference B - A with a paired bootstrap 95%
interval (images resampled, pairs kept), and McNemar's exact test on the images one run got right and the
other wrong (`fgvr.stats`). Unreadable images count as wrong, as in `accuracy`; images of classes the base
does not know are left out of both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fgvr.errors import RunMismatchError
from fgvr.stats import mcnemar_exact, paired_bootstrap

if TYPE_CHECKING:
    from fgvr.records import ResultRow


class CompareError(RunMismatchError, ValueError):
    """The two runs cannot be compared; the message says why and what to do (one line, exit 6)."""


@dataclass
class Comparison:
    run_a: str
    run_b: str
    n: int
    accuracy_a: float
    accuracy_b: float
    difference: float  # accuracy_b - accuracy_a
    ci_low: float
    ci_high: float
    a_only: int  # images A got right and B wrong
    b_only: int
    mcnemar_p: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        verdict = ("the interval excludes 0: B differs from A on these images" if self.ci_low > 0 or self.ci_high < 0
                   else "the interval includes 0: no difference shown on these images")
        return "\n".join([
            f"{self.n} images scored by both runs",
            f"  A {self.run_a}: accuracy {self.accuracy_a:.4f}",
            f"  B {self.run_b}: accuracy {self.accuracy_b:.4f}",
            f"  B - A: {self.difference:+.4f}  (paired bootstrap 95% CI [{self.ci_low:+.4f}, {self.ci_high:+.4f}])",
            f"  McNemar exact: A right / B wrong {self.a_only}, B right / A wrong {self.b_only}, p = {self.mcnemar_p:.4g}",
            f"  {verdict}",
        ])


def _records(run: Path) -> dict[str, ResultRow]:
    from fgvr.records import RESULTS, read_rows

    f = run / RESULTS
    if not f.is_file():
        raise CompareError(f"{run} has no {RESULTS}: pass a folder written by `fgvr evaluate --out`")
    return {r.path: r for r in read_rows(f, repair=False) if r.known}


def compare_runs(run_a: str | Path, run_b: str | Path, *, n_boot: int = 10000, seed: int = 0) -> Comparison:
    """Paired comparison of two evaluation runs over the same images (refused otherwise)."""
    a, b = _records(Path(run_a)), _records(Path(run_b))
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        ex = (only_a or only_b)[:3]
        raise CompareError(
            f"the runs scored different images ({len(only_a)} only in {run_a}, {len(only_b)} only in {run_b}; "
            f"e.g. {', '.join(ex)}): a paired comparison needs the same images. Evaluate both on the same data "
            "with the same --limit"
        )
    if not a:
        raise CompareError(f"{run_a} and {run_b} have no labelled image of a known class to compare")
    paths = sorted(a)
    wrong_label = [p for p in paths if a[p].label != b[p].label]
    if wrong_label:
        raise CompareError(f"the runs label {len(wrong_label)} image(s) differently (e.g. {wrong_label[0]}): "
                           "they were evaluated on different data")
    ca = [bool(a[p].correct) for p in paths]
    cb = [bool(b[p].correct) for p in paths]
    boot = paired_bootstrap([float(x) for x in cb], [float(x) for x in ca], n_boot=n_boot, seed=seed)
    test = mcnemar_exact(ca, cb)
    return Comparison(str(run_a), str(run_b), len(paths), sum(ca) / len(paths), sum(cb) / len(paths),
                      boot["mean"], boot["low"], boot["high"], int(test["a_only"]), int(test["b_only"]),
                      float(test["p_value"]))
