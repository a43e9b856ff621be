"""Builds kdfast/data/bundled/: the WordNet definition dataset and the tiny test tokenizer.

Needs Debian's `wordnet-base` (/usr/share/wordnet). Deterministic: rerunning gives the same files.
"""
from __future__ import annotations

import gzip
import json
import random
import re
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

WORDNET = Path("/usr/share/wordnet")
OUT = Path(__file__).resolve().parent.parent / "kdfast" / "data" / "bundled"
POS = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
N_RECORDS = 6000
TINY_VOCAB = 1024


def monosemous(pos: str) -> set[str]:
    """Lemmas with exactly one sense in this part of speech: their definition is a unique answer."""
    out = set()
    for line in (WORDNET / f"index.{pos}").read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue
        fields = line.split()
        if int(fields[2]) == 1:
            out.add(fields[0])
    return out


def glosses(pos: str, keep: set[str]):
    """(lemma, definition) for each monosemous lemma, examples stripped."""
    for line in (WORDNET / f"data.{pos}").read_text(encoding="latin-1").splitlines():
        if line.startswith(" ") or "|" not in line:
            continue
        head, gloss = line.split("|", 1)
        fields = head.split()
        n_words = int(fields[3], 16)
        definition = re.split(r';\s*"', gloss.strip())[0].strip().rstrip(";").strip()
        for i in range(n_words):
            lemma = re.sub(r"\(.*\)$", "", fields[4 + 2 * i])
            if lemma.lower() in keep and 4 <= len(definition.split()) <= 24:
                yield lemma.replace("_", " "), definition


def build_records() -> list[dict]:
    rng = random.Random(0)
    records, seen = [], set()
    for name, pos in POS.items():
        for lemma, definition in glosses(name, monosemous(name)):
            # One record per word and per definition: synonyms share a gloss, and a gloss in both the private
            # and the public half would leak membership to the students without any distillation.
            if lemma.lower() not in seen and definition.lower() not in seen:
                seen.update((lemma.lower(), definition.lower()))
                records.append({"instruction": f'Define the {name} "{lemma}".', "response": definition,
                                "category": name})
    rng.shuffle(records)
    return records[:N_RECORDS]


def build_tokenizer(records: list[dict]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    template = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                "request.\n\n### Instruction:\n### Input:\n### Response:\n")
    tok.train_from_iterator([template] + [r["instruction"] + "\n" + r["response"] for r in records], trainer)
    return tok


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    records = build_records()
    with gzip.GzipFile(OUT / "wordnet_definitions.jsonl.gz", "wb", mtime=0) as f:
        f.write("".join(json.dumps(r) + "\n" for r in records).encode())
    build_tokenizer(records).save(str(OUT / "tiny_tokenizer.json"))
    shutil.copy("/usr/share/doc/wordnet-base/copyright", OUT / "WORDNET_LICENSE")
    print(f"{len(records)} records -> {OUT}")


if __name__ == "__main__":
    main()
