"""The rounds: each wrong answer on a PROPOSE image reflected on, parsed, merged or trialled, kept or dropped."""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass
from typing import Sequence

from fgvr.experience.heldout import BuildSummary, Item, accuracy_per_part
from fgvr.experience.log import ExperienceLog
from fgvr.experience.reflection import ReflectRequest, Reflector
from fgvr.experience.repair import parse_rule
from fgvr.experience.scoring import Scorer
from fgvr.experience.similarity import TextSimilarity, find_duplicate
from fgvr.experience.trial import Trial, accept
from fgvr.run_dir import Checkpoint
from fgvr.rules import ExperienceLibrary, Rule

log = logging.getLogger("fgvr.experience")


@dataclass
class Build:
    """One build's moving parts, so that each step below stays a few lines."""

    state: dict
    items: list[Item]
    lib: ExperienceLibrary
    scorer: Scorer
    reflector: Reflector
    sim: TextSimilarity
    log: ExperienceLog
    summary: BuildSummary
    names: Sequence[str]
    progress: Checkpoint

    def checkpoint(self) -> None:
        self.state["rules"] = [r.to_json() for r in self.lib.rules]
        self.state["items"] = [asdict(it) for it in self.items]
        self.progress.save(self.state)

    def first_pass(self) -> None:
        """System 1's candidates of every image and the accuracy per part before any new rule."""
        if self.state.get("accuracy_before") is not None:
            return
        results = self.scorer.answers(self.lib, self.items)
        for it, r in zip(self.items, results):
            it.candidates = [c.id for c in r.candidates]
        self.state["accuracy_before"] = accuracy_per_part([r.slow_prediction for r in results], self.items)
        self.checkpoint()

    def run_rounds(self, rounds: int, show_progress: bool) -> None:
        """Passes over the PROPOSE images: each wrong answer may propose a rule (see `learn_from`)."""
        from tqdm import tqdm

        state, lib = self.state, self.lib
        propose = [it for it in self.items if it.part == "propose"]
        while state["round"] <= rounds:
            rnd = state["round"]
            done = set(state["done"])
            if not done:  # (a resumed round keeps the count from its start)
                state["rules_at_round_start"] = len(lib.rules)
            bar = tqdm(propose, desc=f"experience round {rnd}/{rounds}", disable=not show_progress, file=sys.stderr)
            for it in bar:
                if it.path in done:
                    continue
                pred = self.scorer.predict(lib, [it])[0]
                if pred != it.label:
                    self.summary.wrong += 1
                    self.learn_from(it, pred, rnd)
                state["done"].append(it.path)
                self.checkpoint()
                bar.set_postfix(rules=len(lib.rules))
            bar.close()
            state.update(round=rnd + 1, done=[], finished_rounds=rnd)
            self.checkpoint()
            lib.save()  # publish after every round: inference sees whole rounds only
            self.summary.rounds_run += 1
            if len(lib.rules) == state.get("rules_at_round_start", 0) and rnd < rounds:
                log.info("round %d kept no new rule; later rounds would repeat it, stopping", rnd)
                state["round"] = rounds + 1
                self.checkpoint()
                break

    def propose(self, it: Item, pred: int, rnd: int) -> dict | None:
        """Reflect on one mistake (retry once with the strict prompt) and parse the rule, or log why not."""
        from fgvr.data import load_image

        truth, said = self.names[it.label], self.names[pred]
        cand_names = [self.names[c] for c in it.candidates]
        image = load_image(it.path)
        proposal, raws, why = None, [], ""
        for strict in (False, True):
            try:
                raw = self.reflector.reflect([ReflectRequest(image, cand_names, said, truth, strict, it.path)])[0]
            except Exception as e:  # noqa: BLE001 - one failed reflection must not end the build
                raw, why = "", f"reflection failed: {type(e).__name__}: {e}"
            raws.append(raw[:1000])
            proposal, err = parse_rule(raw, cand_names)
            why = why or err
            if proposal is not None:
                return proposal
        self.summary.parse_failed += 1
        self.log.write("parse_failed", rnd, it.path, truth=truth, predicted=said, reason=why, answers=raws)
        return None

    def trial(self, rule: Rule) -> Trial:
        """Re-run the ACCEPT images whose prompt the rule changes, without and with it."""
        touched = [x for x in self.items
                   if x.part == "accept" and rule.overlap([self.names[c] for c in x.candidates])]
        ok_b = [p == x.label for p, x in zip(self.scorer.predict(self.lib, touched), touched)]
        ok_a = [p == x.label for p, x in zip(self.scorer.predict(self.lib, touched, trial=rule), touched)]
        return Trial(n=len(touched), before=sum(ok_b), after=sum(ok_a),
                     fixed=sum(a and not b for a, b in zip(ok_a, ok_b)),
                     broken=sum(b and not a for a, b in zip(ok_a, ok_b)))

    def learn_from(self, it: Item, pred: int, rnd: int) -> None:
        """One wrong answer → reflect → parse → merge / reject / trial on other images → keep or drop."""
        summary, log, lib = self.summary, self.log, self.lib
        if it.label not in it.candidates:
            summary.fast_miss += 1
            log.write("fast_miss", rnd, it.path, truth=self.names[it.label], predicted=self.names[pred],
                      candidates=[self.names[c] for c in it.candidates])
            return
        proposal = self.propose(it, pred, rnd)
        if proposal is None:
            return
        summary.proposed += 1
        dup = find_duplicate(proposal, lib.rules, self.sim)
        if dup is not None:
            dup.proposals += 1
            summary.merged += 1
            log.write("merged", rnd, it.path, into=dup.id, rule=proposal)
            return
        if find_duplicate(proposal, log.rejected, self.sim) is not None:
            summary.rejected += 1
            log.write("rejected", rnd, it.path, rule=proposal, reason="same as a rule rejected before")
            return
        rule = Rule(id=lib.next_id(), classes=proposal["classes"], cue=proposal["cue"], text=proposal["rule"],
                    applies_when=proposal["applies_when"], created_round=rnd, source_image=it.path)
        trial = self.trial(rule)
        record = {"rule": proposal, "trial": {**asdict(trial), "effect": trial.effect}}
        if accept(trial):
            rule.support, rule.effect, rule.fixed, rule.broken = trial.n, trial.effect, trial.fixed, trial.broken
            lib.rules.append(rule)
            summary.accepted += 1
            log.write("accepted", rnd, it.path, id=rule.id, **record)
            return
        summary.rejected += 1
        reason = ("no accept image has its classes among the candidates" if trial.n == 0 else
                  "accuracy on its accept images dropped" if trial.after < trial.before else
                  "fixed no accept image (its own source image does not count)")
        log.write("rejected", rnd, it.path, **record, reason=reason)
