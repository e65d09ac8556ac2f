"""The knowledge base: everything System 1 knows, built once from k labelled images per class.

    kb, summary = build_knowledge_base("photos/", "kb/", shots=5, seed=0)   # or `fgvr build-kb`
    kb = load_knowledge_base("kb/", encoder=spec)                            # refuses another encoder's base

One module per thing that changes on its own:

* `storage`  the records (`KnowledgeBase`, `RetrievalStats`), the on-disk format (manifest, tensors,
             descriptions; atomic save, checksummed load) and the encoder identity check.
* `encoding` support images -> exemplars: decode ahead, batched forward, augmentations, per-class resume.
* `text`     prompt templates, VLM-written class descriptions, text prototypes.
* `fitting`  leave-one-out retrieval statistics and the fusion (w, tau, exemplar weight) System 1 uses.
* `build`    `build_knowledge_base`: the steps above in order, with the build summary.
* `incremental` `fgvr kb add/remove/revert`: encode only new images, refit the rest as a build does.
* `versions` every change a new version, staged beside the base and swapped in by rename, with its log.

Every public name is re-exported here, so `from fgvr.knowledge_base import ...` is all a caller needs.
"""

from fgvr.knowledge_base.storage import (
    DESCRIPTIONS_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    TENSORS_FILE,
    KnowledgeBase,
    KnowledgeBaseError,
    RetrievalStats,
    SupportFile,
    check_encoder,
    format_knowledge_base,
    load_knowledge_base,
    save_knowledge_base,
    support_files,
)
from fgvr.knowledge_base.encoding import (
    AUGMENTATIONS,
    CROP_FRACTION,
    augmented_views,
    default_workers,
    encode_support,
    parse_augment,
)
from fgvr.knowledge_base.text import (
    DEFAULT_TEMPLATES,
    DESCRIPTION_IMAGES,
    DESCRIPTION_MAX_NEW_TOKENS,
    DESCRIPTION_PROMPT,
    DESCRIPTION_WEIGHT,
    describe_classes,
    text_prototypes,
    write_descriptions,
)
from fgvr.knowledge_base.fitting import EXEMPLAR_WEIGHT_GRID, TAU_GRID, W_GRID, choose_fusion, retrieval_stats
from fgvr.knowledge_base.build import KnowledgeBaseBuildSummary, build_knowledge_base
from fgvr.knowledge_base.integrity import manifest_digest, seal_manifest
from fgvr.knowledge_base.versions import VersionRecord, commit_version, content_digest, read_log
from fgvr.knowledge_base.incremental import ChangeSummary, add_images, remove_from_base, revert_base

__all__ = [
    "AUGMENTATIONS", "CROP_FRACTION", "DEFAULT_TEMPLATES", "DESCRIPTIONS_FILE", "DESCRIPTION_IMAGES",
    "DESCRIPTION_MAX_NEW_TOKENS", "DESCRIPTION_PROMPT", "DESCRIPTION_WEIGHT", "EXEMPLAR_WEIGHT_GRID",
    "FORMAT_VERSION", "MANIFEST_FILE", "TAU_GRID", "TENSORS_FILE", "W_GRID", "KnowledgeBase", "KnowledgeBaseBuildSummary",
    "KnowledgeBaseError", "RetrievalStats", "SupportFile", "augmented_views", "build_knowledge_base",
    "check_encoder", "choose_fusion", "default_workers", "describe_classes", "format_knowledge_base", "encode_support",
    "load_knowledge_base", "parse_augment", "retrieval_stats", "save_knowledge_base", "support_files",
    "text_prototypes", "write_descriptions", "manifest_digest", "seal_manifest",
    "VersionRecord", "commit_version", "content_digest", "read_log",
    "ChangeSummary", "add_images", "remove_from_base", "revert_base",
]
