"""The terms a document's text is indexed under besides its words and trigrams — written by
the indexer, looked up by the search: short grams, term grams, the text outside CJK, word pairs.

Short terms: the trigram index cannot answer terms under 3 characters, and 1–2
character Chinese words (报价, 样品, 单) are common.  So each document also carries a
"short-gram" text: every CJK character and every adjacent CJK pair, plus every Latin
word of 1–2 letters.  A short term is answered from those tokens exactly.
"""

from __future__ import annotations

import re

CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002ffff]+")
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


# -- short grams (1–2 character terms) ---------------------------------------------------


def short_grams(text: str) -> list[str]:
    """Tokens for terms the trigram index cannot answer: every CJK character and CJK
    pair, and every Latin word of one or two letters (lower case).  Deduplicated."""
    seen: dict[str, None] = {}
    for run in CJK.findall(text):
        # each character, then the pair it starts (this order: see doctables.remove_records)
        for a, b in zip(run, run[1:], strict=False):
            seen[a] = None
            seen[a + b] = None
        seen[run[-1]] = None
    for word in _WORD.findall(CJK.sub(" ", text)):
        if len(word) <= 2:
            seen[word.lower()] = None
    return list(seen)


def term_grams(term: str) -> list[str]:
    """The short-gram tokens a short (< 3 character) term must all match."""
    grams: list[str] = []
    for run in CJK.findall(term):
        grams.append(run if len(run) <= 2 else run[:2])
    for word in _WORD.findall(CJK.sub(" ", term)):
        grams.append(word.lower())
    return grams



def latin_text(doc: str) -> str:
    """PostgreSQL: ``doc`` with every CJK run (``CJK``) replaced by one space — the text the
    trigram index covers since migration 163.  CJK is found through the short grams (every
    CJK character and pair), so the trigram index needs only the rest: half the trigrams of
    a bench document, a third less server CPU to insert one.  Any piece of a term without
    CJK characters is a substring of this text wherever the term is one of ``doc``
    (``search._pg_substring``); migration 163's SQL (``search_schema.PG_CJK``) gives the
    same text for rows written before it."""
    return CJK.sub(" ", doc)



_PAIR_SPLIT = re.compile(r"[^a-z0-9]+")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def doc_pairs(doc: str) -> list[str]:
    """PostgreSQL: every adjacent pair of ASCII words of a document (``"price list"``), lower
    case, sorted, each once — what migration 153's SQL function ``archive_word_pairs(doc)``
    gives (``regexp_split_to_array(lower(doc), '[^a-z0-9]+')``), computed by the writer since
    migration 161 (the server spent ≈ 0.3 ms a document in it; this costs ≈ 0.07).  The search
    only narrows a phrase's candidates with these pairs (``search._pg_text``), so they must hold
    every pair the SQL function would; a superset is harmless.  Python's ``lower`` and the
    server's agree on which characters become ``a-z``/``0-9`` except two: İ (U+0130, Python
    "i" + U+0307; a UTF-8 LC_CTYPE database "i") and the Kelvin sign (U+212A, "k"; a C LC_CTYPE
    database leaves both alone) — a document holding either gets the pairs of both readings."""
    pairs = _pairs(doc.lower())
    if "\u0130" in doc or "\u212a" in doc:
        pairs |= _pairs(doc.replace("\u0130", "i").lower())
        pairs |= _pairs(doc.translate(_ASCII_LOWER))
    return sorted(pairs)


def _pairs(lowered: str) -> set[str]:
    words = _PAIR_SPLIT.split(lowered)
    return {f"{a} {b}" for a, b in zip(words, words[1:], strict=False) if a and b}

