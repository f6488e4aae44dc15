"""A small, dependency-free language guess for distribution rules (``language: [de]``).

Scripts decide first (CJK ideographs → zh, kana → ja, Hangul → ko, Cyrillic → ru,
Arabic → ar, Thai → th, Greek → el, Hebrew → he); Latin text is scored by common
function words of en, de, fr, es, pt, it, nl, tr, pl.  Good enough to route an
inquiry; it is a guess, and "" means "cannot tell".
"""

from __future__ import annotations

import re
import unicodedata

_STOPWORDS = {
    "en": "the and you for with this that have are please your we our from price quotation would",
    "de": "der die das und ist nicht mit sie ich wir ihr für bitte ein eine angebot preis sehr geehrte",
    "fr": "le la les et est pas avec vous nous pour une des bonjour merci prix votre devis",
    "es": "el la los las y es con para por usted nosotros una precio gracias hola cotización su",
    "pt": "o a os as e é com para por você nós uma preço obrigado olá cotação não",
    "it": "il lo la gli e è con per voi noi una prezzo grazie buongiorno preventivo non",
    "nl": "de het een en is niet met u wij voor prijs bedankt offerte graag",
    "tr": "ve bir bu için ile fiyat teşekkürler merhaba teklif lütfen",
    "pl": "i w na z jest się nie dla cena dziękuję oferta proszę",
}
_WORDS = {lang: frozenset(words.split()) for lang, words in _STOPWORDS.items()}
_TOKEN = re.compile(r"[^\W\d_]+", re.UNICODE)
SAMPLE = 4000  # characters looked at


def _script_counts(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ch in text:
        code = ord(ch)
        if code < 0x0370:
            continue
        if 0x3040 <= code <= 0x30FF:
            key = "ja"
        elif 0xAC00 <= code <= 0xD7AF or 0x1100 <= code <= 0x11FF:
            key = "ko"
        elif 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF:
            key = "han"
        elif 0x0400 <= code <= 0x04FF:
            key = "ru"
        elif 0x0600 <= code <= 0x06FF:
            key = "ar"
        elif 0x0E00 <= code <= 0x0E7F:
            key = "th"
        elif 0x0370 <= code <= 0x03FF:
            key = "el"
        elif 0x0590 <= code <= 0x05FF:
            key = "he"
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
    return counts


def detect(text: str) -> str:
    """An ISO 639-1 code, or "" when the text gives no clear signal."""
    text = unicodedata.normalize("NFC", text[:SAMPLE])
    scripts = _script_counts(text)
    if scripts:
        if scripts.get("ja", 0) >= 3:
            return "ja"  # Japanese mixes kana with kanji
        best = max(scripts, key=scripts.__getitem__)
        if scripts[best] >= 3:
            return "zh" if best == "han" else best
    words = [w.lower() for w in _TOKEN.findall(text)]
    if not words:
        return ""
    scores = {lang: sum(1 for w in words if w in vocab) for lang, vocab in _WORDS.items()}
    best = max(scores, key=scores.__getitem__)
    ranked = sorted(scores.values(), reverse=True)
    if ranked[0] < 2 or ranked[0] == ranked[1]:
        return ""
    return best
