"""The vectorised BM25 of services/ranker/lexical.py against the per-posting loop it replaced
(`reference_search`, the previous implementation kept here as the oracle): equal scores to the
last bit and the same order, ties included, on random corpora under adds, updates and removals."""
from __future__ import annotations

import heapq
import math
import random

import pytest

from services.ranker.lexical import LexicalIndex, tokenize


def reference_search(index: LexicalIndex, query: str, limit: int = 100) -> list[tuple[int, float]]:
    """The dict-and-loop BM25 (the implementation before the vectorised one), over the same
    postings."""
    terms = list(dict.fromkeys(tokenize(query)))
    if not terms:
        return []
    scores: dict[int, float] = {}
    n_docs = len(index._doc)
    if not n_docs:
        return []
    average = index._total_len / n_docs
    k1, b = index.k1, index.b
    weighted = []
    for term in terms:
        postings = index._postings.get(term)
        if postings:
            df = len(postings)
            weighted.append((df, math.log(1.0 + (n_docs - df + 0.5) / (df + 0.5)), postings))
    weighted.sort(key=lambda entry: entry[0])
    doc_len = index._doc_len
    for df, idf, postings in weighted:
        if df > index.common_term_cap and scores:
            items = [(doc, postings[doc]) for doc in scores if doc in postings]
        else:
            items = postings.items()
        for doc, tf in items:
            norm = k1 * (1.0 - b + b * doc_len[doc] / average)
            scores[doc] = scores.get(doc, 0.0) + idf * tf * (k1 + 1.0) / (tf + norm)
    if len(scores) > limit:
        return heapq.nlargest(limit, scores.items(), key=lambda entry: entry[1])
    return sorted(scores.items(), key=lambda entry: -entry[1])


def random_title(rng: random.Random, vocabulary: list[str]) -> str:
    # Zipf-like: a few very common words (many exact ties, capped terms), a long tail.
    words = rng.choices(vocabulary, weights=[1.0 / (rank + 1) for rank in range(len(vocabulary))],
                        k=rng.randint(1, 9))
    return " ".join(words)


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_bm25_equals_the_per_posting_loop(seed):
    rng = random.Random(seed)
    vocabulary = [f"w{n}" for n in range(rng.choice([30, 300, 3000]))]
    cap = rng.choice([5, 50, 2_000])
    index = LexicalIndex(common_term_cap=cap)
    n_docs = rng.choice([50, 400, 3000])
    for doc in range(n_docs):
        index.add(doc, random_title(rng, vocabulary), rng.choice(["", "Belle Rose", "w1 w2"]))
    compared = 0
    for step in range(300):
        action = rng.random()
        if action < 0.15:                                   # a changed title (moves to the end of its postings)
            index.add(rng.randrange(n_docs + 50), random_title(rng, vocabulary))
        elif action < 0.25:
            index.remove(rng.randrange(n_docs + 50))
        query = random_title(rng, vocabulary) + rng.choice(["", " unknownword", " W0!"])
        limit = rng.choice([1, 5, 50, 200])
        got = index.search(query, limit)
        assert got == reference_search(index, query, limit), (seed, step, query, limit)
        compared += bool(got)
    assert compared > 100


def test_ties_are_broken_by_first_appearance_like_the_loop():
    index = LexicalIndex()
    for doc in (5, 3, 9, 1):                        # same text: equal scores
        index.add(doc, "rose balm")
    index.add(3, "rose balm extra")                 # changed: after the others now
    index.add(3, "rose balm")
    assert [doc for doc, _ in index.search("balm", 3)] == [5, 9, 1]
    assert index.search("balm", 3) == reference_search(index, "balm", 3)


def test_rows_are_rebuilt_only_for_terms_that_changed():
    index = LexicalIndex()
    for doc in range(100):
        index.add(doc, f"common t{doc}")
    index.search("common t1")
    built = index.rows_built
    index.search("common t1")
    assert index.rows_built == built                # nothing changed: the rows are reused
    index.add(7, "common t7 new")
    index.search("common t1")
    assert index.rows_built == built + 1            # "common" changed, "t1" did not
    assert index.search("nothing here") == [] and LexicalIndex().search("x") == []


def test_brands_keep_their_sorted_members_current():
    index = LexicalIndex()
    index.add(4, "Serum", "Nordic Glow")
    index.add(2, "Cream", "Nordic Glow")
    assert index.brands_in("nordic glow cream") == [2, 4]
    index.add(1, "Oil", "Nordic Glow")
    index.remove(4)
    assert index.brands_in("nordic glow") == [1, 2] and index.brands_in("nordic glow", limit=1) == [1]
