"""Keep what helps: a proposed rule's trial on the images whose prompt it changes, and the acceptance test."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Trial:
    """A proposed rule re-run on the validation images whose prompt it changes."""

    n: int  # images re-run
    before: int  # correct without the rule
    after: int  # correct with it
    fixed: int
    broken: int

    @property
    def effect(self) -> float:
        return (self.after - self.before) / self.n if self.n else 0.0


def accept(trial: Trial) -> bool:
    """Keep a rule iff accuracy on the ACCEPT images it touches does not drop AND it fixes one of them.

    The trial never includes the image that proposed the rule (that image is in the propose part), so "fixes
    one" means it generalised to at least one image it was not written for. "Does not drop" alone would keep
    rules that change nothing: they cost prompt tokens on every later sample and crowd better rules out of
    the top-n. A rule that fixes as many as it breaks (effect 0, fixed >= 1) is kept: it moved the model
    on the confusion it was written for, on other images, and did not cost accuracy.
    """
    return trial.after >= trial.before and trial.fixed >= 1
