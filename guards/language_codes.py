"""Language codes the language guard knows (ISO 639-1), and the writing system of each.

Kept apart from the detector so that the policy schema can validate codes without importing it.
The codes are those of `lingua-language-detector` 2.x (75 languages). `SCRIPT_OF` groups them by
writing system: a text's script alone names the language for single-language scripts (Thai,
Hangul, Greek, ...), and narrows the statistical detector to a few candidates for the others
(Latin, Cyrillic, Arabic, Devanagari).
"""

from __future__ import annotations

LANGUAGE_NAMES: dict[str, str] = {
    "af": "Afrikaans", "ar": "Arabic", "az": "Azerbaijani", "be": "Belarusian",
    "bg": "Bulgarian", "bn": "Bengali", "bs": "Bosnian", "ca": "Catalan", "cs": "Czech",
    "cy": "Welsh", "da": "Danish", "de": "German", "el": "Greek", "en": "English",
    "eo": "Esperanto", "es": "Spanish", "et": "Estonian", "eu": "Basque", "fa": "Persian",
    "fi": "Finnish", "fr": "French", "ga": "Irish", "gu": "Gujarati", "he": "Hebrew",
    "hi": "Hindi", "hr": "Croatian", "hu": "Hungarian", "hy": "Armenian", "id": "Indonesian",
    "is": "Icelandic", "it": "Italian", "ja": "Japanese", "ka": "Georgian", "kk": "Kazakh",
    "ko": "Korean", "la": "Latin", "lg": "Ganda", "lt": "Lithuanian", "lv": "Latvian",
    "mi": "Maori", "mk": "Macedonian", "mn": "Mongolian", "mr": "Marathi", "ms": "Malay",
    "nb": "Bokmal", "nl": "Dutch", "nn": "Nynorsk", "pa": "Punjabi", "pl": "Polish",
    "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "sk": "Slovak", "sl": "Slovene",
    "sn": "Shona", "so": "Somali", "sq": "Albanian", "sr": "Serbian", "st": "Sotho",
    "sv": "Swedish", "sw": "Swahili", "ta": "Tamil", "te": "Telugu", "th": "Thai",
    "tl": "Tagalog", "tn": "Tswana", "tr": "Turkish", "ts": "Tsonga", "uk": "Ukrainian",
    "ur": "Urdu", "vi": "Vietnamese", "xh": "Xhosa", "yo": "Yoruba", "zh": "Chinese",
    "zu": "Zulu",
}  # fmt: skip
KNOWN_LANGUAGE_CODES = frozenset(LANGUAGE_NAMES)

# The model card's languages: text in these eight; image+text in English only.
CARD_TEXT_LANGUAGES: tuple[str, ...] = ("en", "de", "fr", "it", "pt", "hi", "es", "th")
CARD_IMAGE_LANGUAGES: tuple[str, ...] = ("en",)

# Writing system -> the languages written in it (among the known ones).
SCRIPT_LANGUAGES: dict[str, tuple[str, ...]] = {
    "cyrillic": ("be", "bg", "kk", "mk", "mn", "ru", "sr", "uk"),
    "arabic": ("ar", "fa", "ur"),
    "devanagari": ("hi", "mr"),
    "thai": ("th",),
    "hangul": ("ko",),
    "kana": ("ja",),
    "han": ("zh",),
    "greek": ("el",),
    "hebrew": ("he",),
    "armenian": ("hy",),
    "georgian": ("ka",),
    "bengali": ("bn",),
    "gujarati": ("gu",),
    "gurmukhi": ("pa",),
    "tamil": ("ta",),
    "telugu": ("te",),
}
_NON_LATIN = {code for codes in SCRIPT_LANGUAGES.values() for code in codes}
SCRIPT_LANGUAGES["latin"] = tuple(sorted(KNOWN_LANGUAGE_CODES - _NON_LATIN))


def check_language_code(code: str) -> str:
    """A pydantic validator: a known ISO 639-1 code (lower case)."""
    if code not in KNOWN_LANGUAGE_CODES:
        raise ValueError(
            f"unknown language code {code!r}: use an ISO 639-1 code the detector knows "
            f"(e.g. en, de, fr, it, pt, hi, es, th)"
        )
    return code


def describe(codes: tuple[str, ...] | list[str]) -> str:
    """`English, German and French` for a message."""
    names = [LANGUAGE_NAMES.get(c, c) for c in codes]
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]
