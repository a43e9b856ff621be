"""Issue 13's search: KD and SFT students of the default preset at other sizes, heals, epochs and rates, judged by
the audit's own memorization (ROUGE-L) and health stages, reusing the teacher of a default run folder.

python scripts/student_health_search.py [CANDIDATE ...] [--out runs/search]
  -> one JSON line per student (ROUGE-L, empty answers, repeated 4-grams, distinct-2, held-out cross-entropy)
"""
from __future__ import annotations

import argparse
import json
import time

from kdfast.audit.config import load_config
from kdfast.audit.pipeline import Audit

CANDIDATES = {
    "small": dict(layers=[0, 10, 20, 29]),
    "b8": dict(layers=[0, 4, 8, 12, 16, 20, 24, 29]),
    "b15": dict(layers=list(range(0, 30, 2))),
    "small-e6": dict(layers=[0, 10, 20, 29], epochs=6.0),
    "small-e12": dict(layers=[0, 10, 20, 29], epochs=12.0),
    "heal": dict(layers=[0, 10, 20, 29], heal_records=2000),
    "heal-e6": dict(layers=[0, 10, 20, 29], heal_records=2000, epochs=6.0),
    "heal3-e6": dict(layers=[0, 10, 20, 29], heal_records=2000, heal_epochs=3.0, epochs=6.0),
    "b8-heal3-e6": dict(layers=[0, 4, 8, 12, 16, 20, 24, 29], heal_records=2000, heal_epochs=3.0, epochs=6.0),
    "p1000": dict(layers=[0, 10, 20, 29], n_public=1000),
    "p1000-heal": dict(layers=[0, 10, 20, 29], n_public=1000, heal_records=1400),
    "p640-heal-e3": dict(layers=[0, 10, 20, 29], n_public=640, heal_records=1700, epochs=3.0),
    "heal3": dict(layers=[0, 10, 20, 29], heal_records=2000, heal_epochs=3.0),
    "b8-heal3": dict(layers=[0, 4, 8, 12, 16, 20, 24, 29], heal_records=2000, heal_epochs=3.0),
    "b8-heal3-lr1": dict(layers=[0, 4, 8, 12, 16, 20, 24, 29], heal_records=2000, heal_epochs=3.0, lr=1e-4),
    "b8-heal2-lr1": dict(layers=[0, 4, 8, 12, 16, 20, 24, 29], heal_records=2000, heal_epochs=2.0, lr=1e-4),
}
HEALTH = ("empty_rate", "repeated_4gram", "distinct_2", "cross_entropy")


# What every candidate changes from: the first default (4 blocks, no heal, 2 epochs at 5e-4); heals run at 5e-4.
BASELINE = dict(epochs=2.0, lr=5e-4, heal_records=0, heal_epochs=1.0, heal_lr=5e-4)


def search(name: str, out: str) -> None:
    candidate = CANDIDATES[name]
    cfg = load_config(preset_name="default")  # as `make audit` resolves it, so its teacher stage is reused
    cfg.students.sizes = {name: candidate["layers"]}
    for key, value in BASELINE.items():
        setattr(cfg.students, key, candidate.get(key, value))
    cfg.data.n_public = candidate.get("n_public", 320)
    audit = Audit(cfg, out, progress=False)
    audit.data()
    audit.base()
    teacher = audit.teacher()
    started = time.time()
    for technique in ("kd", "sft"):
        entry = audit.student(teacher, f"{name}/{technique}", "student", f"{technique} ({name})", name,
                              {"technique": technique})
        mem, mem_folder = audit.memorize(entry)
        health = audit.health(entry, mem_folder)
        print(json.dumps({"candidate": name, "technique": technique, "seconds": round(time.time() - started),
                          "rouge_l": mem["rouge_l"], **{k: health[k] for k in HEALTH}}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("candidates", nargs="*", help=f"of {', '.join(CANDIDATES)} (default: all)")
    parser.add_argument("--out", default="runs/search", help="a finished default audit's run folder")
    args = parser.parse_args()
    unknown = sorted(set(args.candidates) - set(CANDIDATES))
    if unknown:
        parser.error(f"unknown candidate {', '.join(unknown)}; choose from {', '.join(CANDIDATES)}")
    for name in args.candidates or CANDIDATES:
        search(name, args.out)


if __name__ == "__main__":
    main()
