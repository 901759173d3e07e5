"""Lexical side of Search: incremental BM25 over title + brand, plus exact title and brand matches.

Semantic retrieval finds "something like" the query; a shopper who types an exact product title
or a brand name expects that product or brand. `LexicalIndex` keeps an inverted index updated per
item change (no rebuild), scores candidates with BM25 (k1 = 1.2, b = 0.75), and answers exact
matches from two hash maps: normalised title -> items and normalised brand -> items (a brand is
matched when it appears as a run of whole words anywhere in the query).

Scoring is vectorised. The postings (term -> {doc: term frequency}) stay plain dicts, so an item
change costs a few dict operations per term; each term also has a posting array (doc ids, term
frequencies, document lengths: one row of a term-document matrix), built when a query first
needs it after the term changed. BM25 depends on the collection's average document length, which
moves with every change, so the arrays hold only what does not (tf, document length) and a query
computes the weights of its terms' rows with a few numpy operations. The arithmetic is the same,
in the same order, as a per-posting loop (`reference_search` in tests/unit/test_ranker_lexical.py),
so scores are equal to the last bit and ties are broken the same way (by first appearance: terms
by document frequency, each term's postings in insertion order).
"""
from __future__ import annotations

import math
import re
import sys
import threading
from dataclasses import dataclass

import numpy as np

_TOKEN = re.compile(r"\w+", re.UNICODE)
# Longest brand name (in words) looked for inside a query.
MAX_BRAND_WORDS = 5


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.casefold())


def normalize(text: str) -> str:
    return " ".join(tokenize(text))


@dataclass(slots=True)
class _Row:
    """One term's postings as arrays (insertion order); replaced, never changed, except for the
    memo of its BM25 weights."""
    docs: np.ndarray       # int64 doc ids
    tf: np.ndarray         # float64 term frequencies
    length: np.ndarray     # float64 lengths of those documents
    # (n_docs, total length) -> the weights of these postings: valid while the collection's
    # statistics are those (the row itself is dropped when one of its documents changes).
    memo: tuple | None = None


class _Scratch(threading.local):
    """Per-thread dense work arrays over doc ids, cleared after each query (only the entries it
    touched), so a query allocates nothing proportional to the catalog."""

    def __init__(self) -> None:
        self.scores = np.zeros(0, np.float64)
        self.seen = np.zeros(0, bool)

    def ensure(self, size: int) -> None:
        if self.scores.shape[0] < size:
            size = max(size, 2 * self.scores.shape[0], 1024)
            self.scores = np.zeros(size, np.float64)
            self.seen = np.zeros(size, bool)


class LexicalIndex:
    def __init__(self, k1: float = 1.2, b: float = 0.75, common_term_cap: int = 2_000) -> None:
        self.k1, self.b = k1, b
        # Terms in more documents than this are only used to re-score candidates found through
        # rarer terms (bounds the work of a query like "cream" on a 100k catalog). Measured on
        # the Beauty titles (500 queries of three title words): 2,000 instead of 20,000 halves
        # the time of a query (1.30 -> 0.66 ms) with the same top 10 (overlap 0.991 either way).
        self.common_term_cap = common_term_cap
        self._lock = threading.Lock()
        self._postings: dict[str, dict[int, int]] = {}
        self._rows: dict[str, _Row] = {}          # built on demand; dropped when the term changes
        self._doc_len: dict[int, int] = {}
        self._doc: dict[int, tuple[str, str, tuple[str, ...]]] = {}
        self._titles: dict[str, int | set[int]] = {}    # normalised title -> its item(s)
        self._brands: dict[str, set[int]] = {}
        self._brand_sorted: dict[str, list[int]] = {}   # memo of sorted(_brands[name])
        self._total_len = 0
        self._max_doc = -1
        self._scratch = _Scratch()
        self.rows_built = 0

    def __len__(self) -> int:
        return len(self._doc)

    def add(self, doc_id: int, title: str, brand: str = "") -> None:
        title_tokens, brand_tokens = tokenize(title), tokenize(brand)
        # Interned: every document's term tuple points at one copy of each term (at 1M titles
        # a tuple of private strings per document cost ~0.5 GB).
        terms = tuple(map(sys.intern, title_tokens + brand_tokens))
        norm_title, norm_brand = " ".join(title_tokens), " ".join(brand_tokens)
        with self._lock:
            previous = self._doc.get(doc_id)
            if previous == (norm_title, norm_brand, terms):
                return
            if previous is not None:
                self._remove_locked(doc_id)
            counts: dict[str, int] = {}
            for term in terms:
                counts[term] = counts.get(term, 0) + 1
            postings, rows = self._postings, self._rows
            for term, count in counts.items():
                entry = postings.get(term)
                if entry is None:
                    postings[term] = {doc_id: count}
                else:
                    entry[doc_id] = count
                rows.pop(term, None)
            self._doc[doc_id] = (norm_title, norm_brand, terms)
            self._doc_len[doc_id] = len(terms)
            self._total_len += len(terms)
            self._max_doc = max(self._max_doc, doc_id)
            if norm_title:
                # one document: its id; more: a set (most titles are unique; a set each cost
                # ~200 bytes per item)
                members = self._titles.get(norm_title)
                if members is None:
                    self._titles[norm_title] = doc_id
                elif isinstance(members, set):
                    members.add(doc_id)
                elif members != doc_id:
                    self._titles[norm_title] = {members, doc_id}
            if norm_brand:
                self._brands.setdefault(norm_brand, set()).add(doc_id)
                self._brand_sorted.pop(norm_brand, None)

    def remove(self, doc_id: int) -> None:
        with self._lock:
            self._remove_locked(doc_id)

    def _remove_locked(self, doc_id: int) -> None:
        previous = self._doc.pop(doc_id, None)
        if previous is None:
            return
        norm_title, norm_brand, terms = previous
        for term in set(terms):
            self._rows.pop(term, None)
            postings = self._postings.get(term)
            if postings is not None:
                postings.pop(doc_id, None)
                if not postings:
                    del self._postings[term]
        self._total_len -= self._doc_len.pop(doc_id, 0)
        self._brand_sorted.pop(norm_brand, None)
        members = self._titles.get(norm_title)
        if isinstance(members, set):
            members.discard(doc_id)
            if len(members) == 1:
                self._titles[norm_title] = next(iter(members))
            elif not members:
                del self._titles[norm_title]
        elif members == doc_id:
            del self._titles[norm_title]
        for table, key in ((self._brands, norm_brand),):
            members = table.get(key)
            if members is not None:
                members.discard(doc_id)
                if not members:
                    del table[key]

    def _row_locked(self, term: str, postings: dict[int, int]) -> _Row:
        row = self._rows.get(term)
        if row is None:
            n = len(postings)
            docs = np.fromiter(postings.keys(), np.int64, n)
            tf = np.fromiter(postings.values(), np.float64, n)
            doc_len = self._doc_len
            length = np.fromiter((doc_len[doc] for doc in postings), np.float64, n)
            row = self._rows[term] = _Row(docs, tf, length)
            self.rows_built += 1
        return row

    # ------------------------------------------------------------------ queries
    def exact_title(self, query: str) -> list[int]:
        """Items whose whole normalised title equals the normalised query."""
        members = self._titles.get(normalize(query))
        if members is None:
            return []
        return sorted(members) if isinstance(members, set) else [members]

    def brands_in(self, query: str, limit: int = 1000) -> list[int]:
        """Items of every brand whose name appears as whole words in the query."""
        words = tokenize(query)
        found: list[int] = []
        with self._lock:
            for start in range(len(words)):
                for end in range(start + 1, min(len(words), start + MAX_BRAND_WORDS) + 1):
                    name = " ".join(words[start:end])
                    members = self._brands.get(name)
                    if members:
                        ordered = self._brand_sorted.get(name)
                        if ordered is None:
                            ordered = self._brand_sorted[name] = sorted(members)
                        found.extend(ordered[: max(0, limit - len(found))])
                        if len(found) >= limit:
                            return found
        return found

    def search(self, query: str, limit: int = 100) -> list[tuple[int, float]]:
        """BM25 top `limit` (doc_id, score), best first (ties: first found first)."""
        terms = list(dict.fromkeys(tokenize(query)))
        if not terms:
            return []
        # Under the lock, only what is consistent at one instant: the statistics and the rows
        # (immutable arrays; any change of a document drops the rows of all its terms).
        with self._lock:
            n_docs = len(self._doc)
            if not n_docs:
                return []
            average = self._total_len / n_docs
            size = self._max_doc + 1
            weighted = []
            for term in terms:
                postings = self._postings.get(term)
                if postings:
                    df = len(postings)
                    weighted.append((df, math.log(1.0 + (n_docs - df + 0.5) / (df + 0.5)),
                                     self._row_locked(term, postings)))
        if not weighted:
            return []
        weighted.sort(key=lambda entry: entry[0])
        statistics = (n_docs, self._total_len)
        k1, b = self.k1, self.b
        one_minus_b, k1_plus_1 = 1.0 - b, k1 + 1.0
        scratch = self._scratch
        scratch.ensure(size)
        scores, seen = scratch.scores, scratch.seen
        found: list[np.ndarray] = []      # docs in order of first appearance (ties keep it)
        try:
            for position, (df, idf, row) in enumerate(weighted):
                memo = row.memo
                if memo is not None and memo[0] == statistics:
                    weights = memo[1]
                else:
                    # The per-posting formula, operation for operation:
                    #   norm = k1 * (1 - b + b * len / avg);  idf * tf * (k1 + 1) / (tf + norm)
                    norm = k1 * (one_minus_b + b * row.length / average)
                    weights = idf * row.tf * k1_plus_1 / (row.tf + norm)
                    row.memo = (statistics, weights)
                docs = row.docs
                if df > self.common_term_cap and position:
                    # A common term only re-scores what rarer terms found.
                    keep = seen[docs]
                    docs, weights = docs[keep], weights[keep]
                else:
                    new = docs[~seen[docs]]
                    seen[new] = True
                    found.append(new)
                scores[docs] += weights
            hits = np.concatenate(found) if len(found) > 1 else found[0]
            values = scores[hits]
        finally:
            for part in found:
                scores[part] = 0.0
                seen[part] = False
        if hits.shape[0] > limit:
            negated = -values
            # Everything that ties with the limit-th best is a candidate; a stable sort over
            # candidates in first-appearance order then cuts exactly where a full sort would.
            threshold = np.partition(negated, limit - 1)[limit - 1]
            candidates = np.flatnonzero(negated <= threshold)
            order = candidates[np.argsort(negated[candidates], kind="stable")[:limit]]
        else:
            order = np.argsort(-values, kind="stable")
        return list(zip(hits[order].tolist(), values[order].tolist()))
