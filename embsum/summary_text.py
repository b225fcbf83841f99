"""How good is a generated user-interest summary? Unigram F1 against the teacher, and degeneracy.

The summary is the paper's served by-product (an explanation a person reads), so two properties
are checked: it says what the teacher says (unigram F1, i.e. ROUGE-1 F1 without stemming), and it
is a sentence rather than a decoding failure. ``degenerate`` names the failure when there is one:
empty output, an empty bracket slot ('()'), a phrase of one to three words
repeated three times in a row ('and and and'), words doubled in place twice or more ('counseling
counseling hesitation hesitation': a decoder that may not repeat a bigram stutters instead),
a character run of four or more inside a word ('jassssss'), punctuation of one to three characters
repeated three times in a row ('),),),'; an ellipsis '...' is fine), or a word that makes up more
than half of a summary of six or more words.
"""

from __future__ import annotations

import re
from collections import Counter

_WORD = re.compile(r"[\w'&-]+")
_RUN = re.compile(r"(\w)\1{3,}")
_PUNCT_RUN = re.compile(r"([^\w\s]{1,3})(?:\s*\1){2,}")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def unigram_f1(pred: str, ref: str) -> float:
    p, r = Counter(words(pred)), Counter(words(ref))
    common = sum((p & r).values())
    if not common:
        return 0.0
    prec, rec = common / sum(p.values()), common / sum(r.values())
    return 2 * prec * rec / (prec + rec)


def degenerate(text: str) -> str | None:
    """Why ``text`` is not a readable summary, or None when it is."""
    w = words(text)
    if not w:
        return "empty"
    if re.search(r"\(\s*\)", text):
        return "empty bracket slot '()'"
    for n in (1, 2, 3):  # a phrase of n words three times in a row
        for i in range(len(w) - 3 * n + 1):
            if w[i:i + n] == w[i + n:i + 2 * n] == w[i + 2 * n:i + 3 * n]:
                return f"repeated {' '.join(w[i:i + n])!r}"
    doubled = [a for a, b in zip(w, w[1:], strict=False) if a == b]
    if len(doubled) >= 2:
        return f"doubled words {doubled[:3]!r}"
    punct = next((m.group(0) for m in _PUNCT_RUN.finditer(text) if m.group(1) != "."), None)
    if punct:
        return f"repeated punctuation {punct!r}"
    run = _RUN.search(text)
    if run and not run.group(0).isdigit():
        return f"character run {run.group(0)!r}"
    top, n = Counter(w).most_common(1)[0]
    if len(w) >= 6 and n > len(w) / 2:
        return f"{top!r} is {n} of {len(w)} words"
    return None
