"""Experience library build: short rules learned from the VLM's own mistakes, kept only out of sample.

The slow path gets better when the VLM is told what it got wrong before ("a shirt has a button placket, a
T-shirt has none"). The published reference builds such rules but leaks the true label into the reasoning
prompt while building them, keeps rules it rejected, pastes every rule into every prompt and aborts on one
malformed JSON answer. Here:

* the build answers exactly as inference does: through `fgvr.pipeline.DualSystem` (System 1, System 2 with
  the retrieved rules in its prompt, the decision), with System 2 on every image;
* the held-out images are split (stratified by class) into three disjoint parts: PROPOSE (mistakes there
  are reflected on and become rule proposals), ACCEPT (a proposed rule is re-run on the accept images whose
  prompt it changes and kept only if their accuracy does not drop AND it fixes at least one of them) and
  REPORT (never used to choose anything: accuracy before and after the rules there is the honest effect).
  So the image that proposed a rule never counts as its fix: a rule that only fixes its own source image
  is rejected. "Touches" = every accept image with one of the rule's classes among its candidates: exactly
  the images whose prompt the rule changes;
* the reasoning prompt never sees the true label; only the reflection step after a wrong answer does;
* rejected rules are gone, their history stays in the log; at inference only the few rules whose classes
  meet the sample's candidates are retrieved (`fgvr.rules`, importable without this module);
* the VLM's JSON is repaired where possible, retried once, and otherwise logged and skipped.

Storage, inside the knowledge base directory:

    experience/rules.json     what inference reads (see `fgvr.rules`), with the images the build used, which
                              `fgvr evaluate` leaves out; written atomically at the end of every round
    experience/log.jsonl      append-only, one JSON line per decision (accepted, rejected, merged,
                              parse_failed, fast_miss), with the trial numbers and the raw answers
    experience/embeddings.safetensors  the held-out images' System 1 embeddings (encoded once)
    experience/progress.json  the build's checkpoint, rewritten atomically after every image: the images and
                              their parts, the round, the images done, the rules so far. One atomic write
                              commits an image's decision and the rules together, so a build killed at any
                              instant resumes where it was (a re-derived decision is never logged twice).
"""

from fgvr.experience.build import EMBEDDINGS_FILE, LOG_FILE, PROGRESS_FILE, build_experience
from fgvr.experience.heldout import PARTS, BuildSummary, Item, split_parts
from fgvr.experience.log import ExperienceLog
from fgvr.experience.reflection import ReflectRequest, Reflector, VlmReflector, reflection_question
from fgvr.experience.repair import extract_json_object, parse_rule
from fgvr.experience.similarity import DUPLICATE_SIMILARITY, TextSimilarity, find_duplicate
from fgvr.experience.trial import Trial, accept
from fgvr.rules import (  # noqa: F401 - re-exported: the public names of the experience library
    EXPERIENCE_DIR,
    FORMAT_VERSION,
    RULES_FILE,
    ExperienceError,
    ExperienceLibrary,
    Rule,
    describe_rules,
    normalise_name,
)

__all__ = ["DUPLICATE_SIMILARITY", "EMBEDDINGS_FILE", "EXPERIENCE_DIR", "FORMAT_VERSION", "LOG_FILE", "PARTS",
           "PROGRESS_FILE", "RULES_FILE", "BuildSummary", "ExperienceError", "ExperienceLibrary", "ExperienceLog",
           "Item", "ReflectRequest", "Reflector", "Rule", "TextSimilarity", "Trial", "VlmReflector", "accept",
           "build_experience", "describe_rules", "extract_json_object", "find_duplicate", "normalise_name",
           "parse_rule", "reflection_question", "split_parts"]
