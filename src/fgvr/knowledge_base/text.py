"""Knowledge-base text: prompt templates, VLM-written class descriptions, and text prototypes.

Encoders with a text tower get one text prototype per class: prompt templates with the class name, mixed
with one VLM-written description per class when a VLM is given. Long descriptions are chunked by
`Encoder.encode_texts`, never truncated.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from fgvr.data import Dataset, ImageError, load_image
from fgvr.run_dir import Checkpoint, identity_key

# CLIP-style prompt templates (a subset of the ensemble CLIP's authors use for ImageNet): several phrasings
# average out the quirks of any one of them.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of the {}.",
    "a good photo of the {}.",
    "a photo of one {}.",
)
DESCRIPTION_WEIGHT = 0.5  # share of the VLM description in a class's text prototype (templates: the rest)
DESCRIPTION_IMAGES = 3
DESCRIPTION_MAX_NEW_TOKENS = 60
DESCRIPTION_PROMPT = (
    "These photos show examples of the class \"{name}\". In one or two sentences, describe the visible "
    "features that distinguish a {name} from similar-looking classes. Answer with the description only."
)


def describe_classes(vlm: Any, class_images: list[tuple[str, list[Image.Image]]], *, batch_size: int = 4,
                     max_new_tokens: int = DESCRIPTION_MAX_NEW_TOKENS, progress: bool = True,
                     on_batch: Callable[[dict[str, str]], None] | None = None,
                     errors: dict[str, str] | None = None) -> dict[str, str]:
    """One description per class of its discriminative visible features, written by the VLM `vlm` (a
    `fgvr.backends` backend: in-process or served, the same text generation as everywhere else).

    Each prompt shows up to 3 support images and asks for the features that tell the class apart; classes
    go to the backend in batches of `batch_size`, greedy, at most `max_new_tokens` new tokens. `on_batch`
    gets each batch's results (the build saves them so a killed build does not regenerate them); a class
    whose request failed gets no description (it is asked again on the next build) and its error in `errors`;
    an answer that is only blanks is a failed request too.
    """
    from tqdm import tqdm

    from fgvr.backends import user_turn

    out: dict[str, str] = {}
    for b in tqdm(range(0, len(class_images), batch_size), desc="describing classes", unit="batch",
                  file=sys.stderr, disable=not progress):
        chunk = class_images[b:b + batch_size]
        conversations = [[user_turn(DESCRIPTION_PROMPT.format(name=name), n_images=len(imgs))] for name, imgs in chunk]
        gen = vlm.generate(conversations, [imgs for _, imgs in chunk], max_new_tokens)
        got = {name: " ".join(g.text.split()) for (name, _), g in zip(chunk, gen) if g.error is None and g.text.strip()}
        if errors is not None:
            errors.update({name: g.error or "the answer's text is empty" for (name, _), g in zip(chunk, gen)
                           if name not in got})
        out.update(got)
        if on_batch is not None:
            on_batch(got)
    return out


def text_prototypes(encoder: Any, classes: list[str], descriptions: dict[str, str],
                    templates: Sequence[str] = DEFAULT_TEMPLATES,
                    description_weight: float = DESCRIPTION_WEIGHT) -> torch.Tensor:
    """(C, D): per class, the normalised mean of its template embeddings, mixed with its description's
    embedding (weight `description_weight`) where it has a non-empty one, re-normalised."""
    prompts = [t.format(c) for c in classes for t in templates]
    emb = encoder.encode_texts(prompts).float().reshape(len(classes), len(templates), -1)
    protos = torch.nn.functional.normalize(emb.mean(1), dim=1)
    have = [i for i, c in enumerate(classes) if descriptions.get(c, "").strip()]
    if have:
        d = encoder.encode_texts([descriptions[classes[i]] for i in have]).float()
        idx = torch.tensor(have)
        protos[idx] = (1 - description_weight) * protos[idx] + description_weight * torch.nn.functional.normalize(d, dim=1)
    return torch.nn.functional.normalize(protos, dim=1)


def write_descriptions(vlm_spec: Any, ds: Dataset, results: dict[int, Any], work_dir: Path, *,
                       max_side: int | None, batch_size: int, progress: bool) -> dict[str, str]:
    """{class name: description} for every class ("" where no image could be read), written by the VLM
    from up to `DESCRIPTION_IMAGES` of the class's encoded support images. Each batch is saved to
    `work_dir` as it finishes, so a resumed build does not write the same descriptions again."""
    key = vlm_spec.describe()["key"]  # vlm_spec: the VLM's backend (fgvr.backends)
    saved = Checkpoint(work_dir / f"descriptions-{identity_key(key, 12)}.json")  # one file per describing VLM
    descriptions = saved.load() if saved.exists() else {}
    pending = []
    for cid, name in enumerate(ds.classes):
        if name in descriptions:
            continue
        imgs = []
        for rel in results[cid][1]:
            if len(imgs) == DESCRIPTION_IMAGES:
                break
            try:  # re-read: keeping every decoded image for this step would not bound memory
                imgs.append(load_image(Path(rel) if Path(rel).is_absolute() else ds.root / rel, max_side=max_side))
            except ImageError:  # changed on disk since it was encoded: describe from the others
                continue
        if imgs:
            pending.append((name, imgs))
    if pending:
        def save_batch(got: dict[str, str]) -> None:
            descriptions.update(got)
            saved.save(descriptions)

        errors: dict[str, str] = {}
        describe_classes(vlm_spec, pending, batch_size=batch_size, progress=progress, on_batch=save_batch,
                         errors=errors)
        if errors:
            from fgvr.errors import System2Error

            first = next(iter(errors.items()))
            raise System2Error(
                f"the VLM wrote no description for {len(errors)} of {len(pending)} class(es) (first: {first[0]}: "
                f"{first[1]}); the {len(pending) - len(errors)} written are kept in {work_dir}: fix the cause and "
                "run the same build-kb again to ask for the rest")
    return {c: descriptions.get(c, "") for c in ds.classes}
