"""ROUGE-L utility: rouge_score's stemmed ROUGE-L (the field's setting) and the greedy responses it scores."""
import pytest
from rouge_score import rouge_scorer

from kdfast.audit.utility import greedy_responses, mean_rouge_l, rouge_l

PAIRS = [
    ("The cats were running quickly", "a cat runs quickly"),  # stemming: cats/cat, running/runs
    ("connected connections connecting", "connect connection"),
    ("Hello, World!", "hello world"),  # case and punctuation
    ("", "a reference"),
    ("completely different words", "nothing shared here"),
    ("studies studying studied", "the student studied"),
]


def _lcs(a, b):
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


@pytest.mark.parametrize("prediction,reference", PAIRS)
def test_rouge_l_is_rouge_scores_stemmed_rouge_l(prediction, reference):
    expected = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction)["rougeL"].fmeasure
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12)


def test_stemming_counts_inflections_as_matches():
    # The F1 of the longest common subsequence of Porter-stemmed tokens, written out: cat, run, quickli match.
    from nltk.stem import porter  # rouge_score's own stemmer

    stem = porter.PorterStemmer().stem
    p = [stem(w) for w in ["the", "cats", "were", "running", "quickly"]]
    r = [stem(w) for w in ["a", "cat", "runs", "quickly"]]
    lcs = _lcs(p, r)
    f1 = 2 * (lcs / len(p)) * (lcs / len(r)) / (lcs / len(p) + lcs / len(r))
    assert lcs == 3 and rouge_l("The cats were running quickly", "a cat runs quickly") == pytest.approx(f1)
    unstemmed = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score("a cat runs quickly",
                                                                               "The cats were running quickly")
    assert rouge_l("The cats were running quickly", "a cat runs quickly") > unstemmed["rougeL"].fmeasure


def test_mean_and_its_errors():
    preds, refs = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    assert mean_rouge_l(preds, refs) == pytest.approx(sum(rouge_l(p, r) for p, r in PAIRS) / len(PAIRS))
    with pytest.raises(ValueError, match="as many predictions"):
        mean_rouge_l(preds[:2], refs)


def test_greedy_responses_are_the_memorization_generations():
    from kdfast.memorization import match_accuracy
    from kdfast.models import load_model

    model, tok = load_model("tiny:llama")
    records = [{"instruction": f"Define word {i}.", "response": "A word."} for i in range(3)]
    texts = greedy_responses(model, tok, records, n_tokens=6, batch_size=2)
    assert texts == match_accuracy(model, tok, records, n_tokens=6, progress=False).generated
    assert len(greedy_responses(model, tok, records[:1], n_tokens=2)) == 1
