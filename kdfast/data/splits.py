"""The study's split: the training split halved into private (teacher, members) and public (students),
validation = non-members."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from kdfast.data.records import record_key


@dataclass
class StudySplit:
    """private: the teacher's training data (members); public: the students' distillation data;
    nonmembers: held out from everything; dropped: duplicates removed across splits; spare: the public records
    beyond the n_public cap (neither members nor non-members: what a student may be healed on)."""

    private: list[dict]
    public: list[dict]
    nonmembers: list[dict]
    dropped: dict[str, int] = field(default_factory=dict)
    spare: list[dict] = field(default_factory=list)

    def balanced(self, limit: int | None = None) -> tuple[list[dict], list[dict]]:
        """(members, non-members) of equal size for the attacks, at most `limit` each."""
        n = min(len(self.private), len(self.nonmembers), limit or len(self.private))
        return self.private[:n], self.nonmembers[:n]

    def summary(self) -> str:
        d = ", ".join(f"{k}: {v}" for k, v in self.dropped.items() if v) or "none"
        return (f"{len(self.private)} private (members), {len(self.public)} public, "
                f"{len(self.nonmembers)} non-members; duplicates dropped: {d}")


def dedupe(records: list[dict]) -> tuple[list[dict], int]:
    """Records with repeated keys removed (first kept); returns (records, how many dropped)."""
    seen, out = set(), []
    for r in records:
        k = record_key(r)
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out, len(records) - len(out)


def study_split(train: list[dict], validation: list[dict] | None = None, *, validation_fraction: float = 0.2,
                n_members: int | None = None, n_public: int | None = None, seed: int = 0) -> StudySplit:
    """Split as the study does; with no validation split, `validation_fraction` of `train` is held out.

    Duplicates inside a split and records that appear in more than one split are dropped (a record both
    member and non-member makes the AUC meaningless). n_members / n_public cap the private and public
    halves; `balanced()` gives the attacks equal member and non-member counts.
    """
    rng = random.Random(seed)
    train, dup_train = dedupe(train)
    train = train[:]
    rng.shuffle(train)
    if validation is None:
        n_val = max(1, int(len(train) * validation_fraction))
        validation, train = train[:n_val], train[n_val:]
    validation, dup_val = dedupe(validation)
    train_keys = {record_key(r) for r in train}
    nonmembers = [r for r in validation if record_key(r) not in train_keys]
    crossed = len(validation) - len(nonmembers)
    half = len(train) // 2
    private, public = train[:half], train[half:]
    if validation and not nonmembers:
        raise ValueError(f"every one of the {len(validation)} validation (non-member) records is also in the training "
                         "source: the two overlap entirely; give non-members that are not in the source (the audit's "
                         "data.validation), or leave data.validation unset to hold some of the source out")
    if not private or not public or not nonmembers:
        raise ValueError(f"not enough records for a study: {len(train)} train and {len(validation)} validation "
                         "records after de-duplication; give at least 3 distinct records")
    n_public = n_public or len(public)
    return StudySplit(private[: n_members or len(private)], public[:n_public], nonmembers,
                      {"duplicates in train": dup_train, "duplicates in validation": dup_val,
                       "validation records also in train": crossed}, public[n_public:])
