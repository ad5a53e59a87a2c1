"""Language codes: the readable name a prompt uses, and the choices that follow the target language.

A language is given as a BCP-47 code (``en``, ``de``, ``zh``, ``zh-Hant``, ``pt-BR``); its primary subtag picks the
name from :data:`NAMES` (the languages of FLORES-200 that have a two-letter ISO 639-1 code, plus the common
three-letter ones). A code not listed needs its name given (``prompt.src_name`` / ``prompt.tgt_name``).
"""

from __future__ import annotations

import re

from distillmt.errors import DistillmtError

NAMES = {
    "af": "Afrikaans", "am": "Amharic", "ar": "Arabic", "as": "Assamese", "az": "Azerbaijani", "be": "Belarusian",
    "bg": "Bulgarian", "bn": "Bengali", "bo": "Tibetan", "bs": "Bosnian", "ca": "Catalan", "cs": "Czech",
    "cy": "Welsh", "da": "Danish", "de": "German", "el": "Greek", "en": "English", "eo": "Esperanto",
    "es": "Spanish", "et": "Estonian", "eu": "Basque", "fa": "Persian", "fi": "Finnish", "fil": "Filipino",
    "fo": "Faroese", "fr": "French", "ga": "Irish", "gd": "Scottish Gaelic", "gl": "Galician", "gu": "Gujarati",
    "ha": "Hausa", "he": "Hebrew", "hi": "Hindi", "hr": "Croatian", "ht": "Haitian Creole", "hu": "Hungarian",
    "hy": "Armenian", "id": "Indonesian", "ig": "Igbo", "is": "Icelandic", "it": "Italian", "ja": "Japanese",
    "jv": "Javanese", "ka": "Georgian", "kk": "Kazakh", "km": "Khmer", "kn": "Kannada", "ko": "Korean",
    "ku": "Kurdish", "ky": "Kyrgyz", "la": "Latin", "lb": "Luxembourgish", "lo": "Lao", "lt": "Lithuanian",
    "lv": "Latvian", "mg": "Malagasy", "mi": "Maori", "mk": "Macedonian", "ml": "Malayalam", "mn": "Mongolian",
    "mr": "Marathi", "ms": "Malay", "mt": "Maltese", "my": "Burmese", "nb": "Norwegian Bokmål", "ne": "Nepali",
    "nl": "Dutch", "nn": "Norwegian Nynorsk", "no": "Norwegian", "ny": "Chichewa", "oc": "Occitan", "or": "Odia",
    "pa": "Punjabi", "pl": "Polish", "ps": "Pashto", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian",
    "rw": "Kinyarwanda", "sd": "Sindhi", "si": "Sinhala", "sk": "Slovak", "sl": "Slovenian", "sm": "Samoan",
    "sn": "Shona", "so": "Somali", "sq": "Albanian", "sr": "Serbian", "st": "Sesotho", "su": "Sundanese",
    "sv": "Swedish", "sw": "Swahili", "ta": "Tamil", "te": "Telugu", "tg": "Tajik", "th": "Thai", "tk": "Turkmen",
    "tl": "Tagalog", "tr": "Turkish", "tt": "Tatar", "ug": "Uyghur", "uk": "Ukrainian", "ur": "Urdu", "uz": "Uzbek",
    "vi": "Vietnamese", "wo": "Wolof", "xh": "Xhosa", "yi": "Yiddish", "yo": "Yoruba", "yue": "Cantonese",
    "zh": "Chinese", "zu": "Zulu", "cmn": "Chinese", "ast": "Asturian", "ceb": "Cebuano", "haw": "Hawaiian",
}  # fmt: skip

_CODE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*$")
_TRADITIONAL = {"hant", "tw", "hk", "mo"}


def primary(code: str) -> str:
    """The primary language subtag, lower case: ``zh`` for ``zh-Hans-CN``."""
    return code.split("-")[0].lower()


def check_code(code: str, key: str) -> None:
    """Refuse what is not shaped like a BCP-47 code (``en``, ``pt-BR``, ``zh-Hant``), naming the config key."""
    if not isinstance(code, str) or not _CODE.match(code):
        raise DistillmtError(
            f"config key '{key}' = {code!r} is not a BCP-47 language code (examples: en, de, zh, zh-Hant, pt-BR)"
        )


def name(code: str, given: str | None = None, key: str = "data.src_lang") -> str:
    """The language's name as a prompt says it: ``given`` when set, else the name of the code's primary subtag."""
    if given:
        return given
    try:
        return NAMES[primary(code)]
    except KeyError:
        prompt_key = "prompt.src_name" if key.endswith("src_lang") else "prompt.tgt_name"
        raise DistillmtError(
            f"config key '{key}' = {code!r}: no built-in name for this language; give the name the prompt should use "
            f"with {prompt_key}=..."
        ) from None


def is_chinese(code: str) -> bool:
    return primary(code) in ("zh", "cmn")


def is_simplified_chinese(code: str) -> bool:
    """Chinese not marked Traditional (``zh``, ``zh-Hans``, ``zh-CN``; not ``zh-Hant``, ``zh-TW``, ``zh-HK``)."""
    return is_chinese(code) and not _TRADITIONAL & {part.lower() for part in code.split("-")[1:]}


def bleu_tokenizer(code: str) -> str:
    """The BLEU tokenizer sacrebleu picks for a target language (``zh`` → zh, ``ja`` → ja-mecab, ``ko`` → ko-mecab,
    every other → 13a). A tokenizer whose optional package is missing is an error now, naming the package."""
    import sacrebleu

    lang = "zh" if is_chinese(code) else primary(code)
    try:
        return sacrebleu.BLEU(trg_lang=lang).tokenizer.signature()
    except (ImportError, ModuleNotFoundError, RuntimeError) as e:
        extra = {"ja": "sacrebleu[ja]", "ko": "sacrebleu[ko]"}.get(lang, "sacrebleu's optional tokenizer")
        why = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise DistillmtError(
            f"BLEU for target language {code!r} uses sacrebleu's tokenizer {sacrebleu.BLEU._TOKENIZER_MAP[lang]!r}, "
            f"which cannot load ({why}): pip install '{extra}', or set eval.bleu_tokenize (13a, char, spm, ...)"
        ) from None
