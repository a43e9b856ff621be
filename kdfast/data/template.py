"""The Alpaca prompt template of the study: instruction (+ input) prompt, response after it."""
from __future__ import annotations

PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def prompt_text(record: dict) -> str:
    """The full instruction prompt of an instruction record; "" for a {"text"} record."""
    if "text" in record:
        return ""
    if record.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT.format(instruction=record["instruction"])


def target_text(record: dict) -> str:
    """The part that is scored and trained on: the response, or the whole text of a {"text"} record."""
    return record["text"] if "text" in record else record["response"]
