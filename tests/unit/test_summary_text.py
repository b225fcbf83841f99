"""Summary quality checks: unigram F1 and the degenerate forms seen in real runs (no Ray)."""

from __future__ import annotations

import pytest

from embsum.summary_text import degenerate, unigram_f1


@pytest.mark.parametrize("text", [
    "The user reads mostly (), (), (), (), (), (jassssssssss,) and and and",  # the demo's output at 100 steps
    "", "   ", "the the the user", "The user reads mostly Stephen King ()", "jassssss reads",
    "and or and or and or and or",
    "The user reads mostly),),),ing,",  # the demo's best-by-validation checkpoint at 125 of 250 steps
    "The user reads mostly ;;; and King", "mostly - - - King",
    # lambda 0 decoded with beams and no repeated bigram (bench/results/quality.md)
    "counseling counseling hesitation hesitationtrecerea counseling décidé décidé counseling 8 8 counseling",
])
def test_degenerate_outputs_are_named(text):
    assert degenerate(text) is not None


@pytest.mark.parametrize("text", [
    "The user reads mostly Stephen King and John Grisham; recurring topics: harry, potter.",
    "The user reads mostly sports (nfl, soccer) and finance.", "Born in 1999, reads 2000s thrillers",
    "The user reads mostly technology (ai, gadgets)... and sports (nfl).", "reads King, Koontz, Rice, Grisham",
    "The user reads mostly Duran Duran; recurring topics: new, york.",  # one doubled word is a name, not a stutter
])
def test_readable_summaries_pass(text):
    assert degenerate(text) is None


def test_unigram_f1():
    assert unigram_f1("a b c", "a b c") == 1.0
    assert unigram_f1("x y", "a b") == 0.0
    assert unigram_f1("The user reads King", "the user reads Grisham") == pytest.approx(0.75)
    assert unigram_f1("a a", "a") == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts are clipped
