"""Per-query metrics on hand-checked cases (values computed by hand in the comments)."""

from __future__ import annotations

import pytest
from seqeval.metrics import f1_score

from routenlp_core import metrics
from routenlp_core.tasks import get_task


def test_label_accuracy_ignores_case_quotes_punctuation_and_underscores():
    assert metrics.label_accuracy("Card Arrival.", "card_arrival") == 1.0
    assert metrics.label_accuracy(" `card-arrival` ", "card_arrival") == 1.0
    assert metrics.label_accuracy("**Unilateral  change**", "Unilateral change") == 1.0
    assert metrics.label_accuracy("card arrival soon", "card_arrival") == 0.0
    assert metrics.label_accuracy("", "card_arrival") == 0.0


def test_label_normalisation_keeps_every_label_set_distinct():
    for name in ("banking77", "clinc150", "unfair_tos", "financial_phrasebank"):
        labels = get_task(name).labels()
        assert len({metrics.normalise_label(label) for label in labels}) == len(labels), name


def test_clause_set_f1_by_hand():
    gold = ["Anti-Assignment", "Insurance"]
    # predicted {antiassignment, governinglaw}: 1 shared of 2 + 2 -> 2*1/4
    assert metrics.clause_set_f1("anti assignment, Governing_Law", gold) == 0.5
    assert metrics.clause_set_f1("- Insurance\n- Anti-Assignment", gold) == 1.0
    assert metrics.clause_set_f1("Insurance; Insurance", ["Insurance"]) == 1.0
    assert metrics.clause_set_f1("none", gold) == 0.0
    assert metrics.set_f1(set(), set()) == 1.0


TOKENS = ["Evergreen", "Solar", "Inc", ".", "and", "John", "Smith", "of", "Boston", "."]
GOLD = ["I-ORG", "I-ORG", "I-ORG", "O", "O", "I-PER", "I-PER", "O", "I-LOC", "O"]


def test_ner_entity_f1_on_a_hand_made_iob1_sentence():
    answer = "ORG: Evergreen Solar Inc\nPERSON: John Smith"
    tags, unmatched = metrics.entities_to_iob1(TOKENS, metrics.parse_entities(answer))
    assert tags == ["I-ORG", "I-ORG", "I-ORG", "O", "O", "I-PER", "I-PER", "O", "O", "O"]
    assert unmatched == 0
    # 2 of 3 gold entities found, no false positive: 2*2/(2*2+0+1) = 0.8, as seqeval says
    assert metrics.ner_entity_f1(answer, TOKENS, GOLD) == pytest.approx(0.8)
    assert f1_score([GOLD], [tags]) == pytest.approx(0.8)
    # a hallucinated entity is a false positive: 2*2/(4+1+1)
    json_answer = ('```json\n[{"type": "ORG", "text": "Evergreen Solar Inc"}, {"type": "PER", "text": "John Smith"},'
                   ' {"type": "LOC", "text": "Paris"}]\n```')
    assert metrics.ner_entity_f1(json_answer, TOKENS, GOLD) == pytest.approx(4 / 6)
    # "Inc." spans the tokens "Inc" "." -> wrong span: 1 tp, 1 fp, 2 fn -> 2/(2+1+2)
    assert metrics.ner_entity_f1("ORG: Evergreen Solar Inc.\nLOC: boston", TOKENS, GOLD) == pytest.approx(0.4)


def test_ner_adjacent_same_type_entities_get_iob1_b_tag_and_empty_sentence_rule():
    tags, _ = metrics.entities_to_iob1(["Acme", "Beta"], [("ORG", "Acme"), ("ORG", "Beta")])
    assert tags == ["I-ORG", "B-ORG"]
    assert len(metrics.tag_entities(tags)) == 2
    assert metrics.ner_entity_f1("[]", ["the", "loan"], ["O", "O"]) == 1.0
    assert metrics.ner_entity_f1("ORG: loan", ["the", "loan"], ["O", "O"]) == 0.0
    assert metrics.ner_entity_f1("I cannot find any.", TOKENS, GOLD) == 0.0


def test_ner_matching_is_case_sensitive_first_so_each_mention_must_be_listed():
    tokens, gold = ["Acme", "Corp", "/", "ACME", "CORP"], ["I-ORG", "I-ORG", "O", "I-ORG", "I-ORG"]
    # "Acme Corp" tags only its own mention: 1 tp, 1 fn -> 2/3; listing both mentions is perfect
    assert metrics.ner_entity_f1("ORG: Acme Corp", tokens, gold) == pytest.approx(2 / 3)
    assert metrics.ner_entity_f1("ORG: Acme Corp\nORG: ACME CORP", tokens, gold) == 1.0
    # no case-sensitive match at all: falls back to ignoring case
    assert metrics.ner_entity_f1("ORG: acme corp", ["Acme", "Corp"], ["I-ORG", "I-ORG"]) == 1.0


def test_rouge_l_on_a_known_pair():
    # LCS "the cat on the mat" = 5 of 6 tokens each side -> P = R = F = 5/6
    assert metrics.rouge_l("the cat was on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    assert metrics.rouge_l("Revenue rose 5%.", "Revenue rose 5%.") == pytest.approx(1.0)
    assert metrics.rouge_l("", "Revenue rose 5%.") == 0.0


def test_bertscore_identical_is_one_unrelated_is_clearly_lower():
    reference = "I'm sorry your order has not arrived yet. Please share your order number so I can track it."
    paraphrase = "Sorry that your order hasn't arrived. Send me the order number and I will track it."
    unrelated = "The quarterly dividend was raised to 42 cents per share."
    identical, close, far, empty = metrics.bertscore_f1([reference, paraphrase, unrelated, ""], [reference] * 4)
    assert identical == pytest.approx(1.0, abs=1e-5)
    assert far < 0.5 < close < identical
    assert empty == 0.0
    assert get_task("bitext").acceptable(paraphrase, reference) == (close >= 0.65)
    with pytest.raises(ValueError):
        metrics.bertscore_f1(["a"], [])
