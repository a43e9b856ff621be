"""Records, the study's prompt template and splits, tokenization and batching; the bundled WordNet default."""
from kdfast.data.encode import (
    IGNORE_INDEX,
    Encoded,
    encode,
    encode_all,
    next_token_targets,
    pad_batch,
    token_budget_batches,
)
from kdfast.data.labeled import load_labeled, load_membership
from kdfast.data.records import RecordError, bundled_records, load_hub_dataset, load_records, normalize, record_key
from kdfast.data.splits import StudySplit, dedupe, study_split
from kdfast.data.template import prompt_text, target_text

__all__ = [
    "IGNORE_INDEX", "Encoded", "encode", "encode_all", "next_token_targets", "pad_batch", "token_budget_batches",
    "RecordError", "bundled_records", "load_hub_dataset", "load_records", "normalize", "record_key",
    "StudySplit", "dedupe", "study_split", "prompt_text", "target_text", "load_labeled",
    "load_membership",
]
