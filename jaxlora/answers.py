"""Text answers judged: a generated answer against the reference one.

    exact match   the two equal once normalized (case, and whitespace and
                  punctuation around them, do not count)
    labels        with `data.labels`, each answer is read as the first label it
                  names (a whole word, any case), or as none; the references
                  are read alike, and the pairs give accuracy, macro-F1 and
                  per-label scores exactly as a classifier's predictions do
                  (`jaxlora.tasks.classification_metrics`), an answer that names
                  no label counting as wrong

Used on both sides of a run: the data (a row whose reference answer names no
label is dropped and counted) and the evaluation of greedy answers.
"""

from __future__ import annotations

import re
import string

import numpy as np

NONE = -1  # the label id of an answer that names no label

_AROUND = string.whitespace + string.punctuation


def normalized(text: str) -> str:
    """`text` lowercased, without the whitespace and punctuation around it (an
    answer of punctuation alone stays itself, without the whitespace)."""
    return text.strip(_AROUND).lower() or text.strip()


def first_label(text: str, labels: list[str]) -> int:
    """The id of the label `text` names first (as a whole word, in any case; of
    two that start at the same place, the longer: "no answer" before "no"),
    or `NONE`."""
    best, key = NONE, None
    for i, label in enumerate(labels):
        found = re.search(rf"(?<!\w){re.escape(label.lower())}(?!\w)", text.lower())
        if found and (key is None or (found.start(), -len(label)) < key):
            best, key = i, (found.start(), -len(label))
    return best


def judge(completions: list[str], references: list[str], labels: list[str] | None) -> dict:
    """Exact match of the normalized texts, and with `labels` the scores of the
    labels they name (see the module docstring): `answered_no_label` counts
    the answers that named none."""
    from jaxlora.tasks import classification_metrics

    if not references:
        return {"exact_match": None, "exact_match_examples": 0}
    hits = sum(normalized(c) == normalized(r) for c, r in zip(completions, references))
    out = {"exact_match": hits / len(references), "exact_match_examples": len(references)}
    if labels:
        predicted = np.array([first_label(c, labels) for c in completions], np.int64)
        actual = np.array([first_label(r, labels) for r in references], np.int64)
        keep = actual != NONE  # references name a label by construction; guard all the same
        scores = classification_metrics(predicted[keep], actual[keep], labels)
        scores.pop("examples")  # exact_match_examples says how many were judged
        out.update(scores, answered_no_label=int((predicted[keep] == NONE).sum()))
    return out
