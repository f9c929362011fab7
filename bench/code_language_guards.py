"""What the Code Shield and language guards add per request, and the detector's short-text
accuracy. Baseline in the same process: the profanity guard (the embedded guard that already
sits on every request) on the same text.

    python bench/code_language_guards.py [--repeats 300]

Timed: `LanguageGuard.check` on 1,000 characters (French prose; the guard's own path, inline
on the event loop); `CodeShieldGuard.check` on a completion without code, on one with a 40-line
Python block that no prescan pattern matches (regex rules only), and on one where a prescan
matches (a semgrep-core run). Accuracy: short texts (<= 60 characters) in the card's eight
languages and in others, judged as text requests under the card's languages: correct, unknown
(never flagged), wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

from guards.base import GuardInput
from guards.code_scan import CodeScanner
from guards.code_shield import CodeShieldGuard
from guards.language import LanguageGuard
from guards.language_codes import CARD_TEXT_LANGUAGES
from guards.profanity import ProfanityGuard
from model.engine import ChatTurn, TextPart

FRENCH = (
    "Le comité a longuement discuté du budget de l'année prochaine, puis il a décidé de "
    "consacrer une part plus grande aux écoles et aux bibliothèques de la région. "
) * 8
FRENCH = FRENCH[:1000]
PROSE = "Sure. Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. " * 4
BENIGN_40 = "".join(f"def step_{i}(x):\n    return x * {i} + 1\n" for i in range(20))
PRESCAN_40 = (
    "import pickle\n"
    + BENIGN_40[: -len("    return x * 19 + 1\n")]
    + ("    return pickle.loads(x)\n")
)

SHORT = {
    "en": ["What time is it in London?", "Please summarise this article.",
           "How do I bake sourdough bread?", "Thanks, that was very helpful!"],
    "de": ["Wie spät ist es in Berlin?", "Bitte fasse diesen Artikel zusammen.",
           "Wie backe ich Sauerteigbrot?", "Danke, das war sehr hilfreich!"],
    "fr": ["Quelle heure est-il à Paris ?", "Résume cet article, s'il te plaît.",
           "Comment faire du pain au levain ?", "Merci, c'était très utile !"],
    "it": ["Che ore sono a Roma?", "Per favore, riassumi questo articolo.",
           "Come si fa il pane con il lievito madre?", "Grazie, è stato molto utile!"],
    "pt": ["Que horas são em Lisboa?", "Por favor, resuma este artigo.",
           "Como faço pão de fermentação natural?", "Obrigado, foi muito útil!"],
    "es": ["¿Qué hora es en Madrid?", "Por favor, resume este artículo.",
           "¿Cómo hago pan de masa madre?", "¡Gracias, fue muy útil!"],
    "hi": ["दिल्ली में कितने बजे हैं?", "कृपया इस लेख का सारांश दें।"],
    "th": ["ที่กรุงเทพฯ ตอนนี้กี่โมงแล้ว", "ช่วยสรุปบทความนี้ให้หน่อย"],
    "nl": ["Hoe laat is het in Amsterdam?", "Vat dit artikel alsjeblieft samen.",
           "Hoe bak ik zuurdesembrood?", "Bedankt, dat was erg nuttig!"],
    "pl": ["Która godzina jest w Warszawie?", "Proszę, streść ten artykuł.",
           "Jak upiec chleb na zakwasie?", "Dziękuję, to było bardzo pomocne!"],
    "sw": ["Ni saa ngapi huko Nairobi?", "Tafadhali fupisha makala hii.",
           "Ninaokaje mkate wa chachu?", "Asante, hiyo ilisaidia sana!"],
    "tr": ["İstanbul'da saat kaç?", "Lütfen bu makaleyi özetle.",
           "Ekşi mayalı ekmek nasıl yapılır?", "Teşekkürler, çok yardımcı oldu!"],
    "ru": ["Который час в Москве?", "Пожалуйста, кратко изложи эту статью."],
    "ja": ["東京は今何時ですか？", "この記事を要約してください。"],
}  # fmt: skip


def item(text: str, stage: str = "input") -> GuardInput:
    if stage == "output":
        turns = (ChatTurn("user", (TextPart("Write it."),)),)
        return GuardInput("output", turns, completion=text)
    return GuardInput("input", (ChatTurn("user", (TextPart(text),)),))


async def timed(fn: Callable[[], Awaitable[object]], repeats: int) -> tuple[float, float]:
    for _ in range(5):
        await fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        await fn()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return samples[len(samples) // 2], samples[min(len(samples) - 1, int(len(samples) * 0.99))]


async def main(repeats: int) -> None:
    language = LanguageGuard()
    started = time.perf_counter()
    language.load()
    print(f"language detectors loaded in {time.perf_counter() - started:.1f} s")
    profanity = ProfanityGuard()
    profanity.load()
    shield = CodeShieldGuard(CodeScanner(), workers=2)
    started = time.perf_counter()
    shield.load()
    print(f"code shield loaded (semgrep rule self-check) in {time.perf_counter() - started:.1f} s")
    french = [item(FRENCH)]
    rows = [
        ("profanity, 1,000 chars (baseline)", lambda: profanity.check(french)),
        ("language, 1,000 chars", lambda: language.check(french)),
        ("code_shield, completion without code", lambda: shield.check([item(PROSE, "output")])),
    ]
    results = {name: await timed(fn, repeats) for name, fn in rows}

    # The scanner caches per block: a fresh block per call measures the scan itself.
    counter = iter(range(10**9))

    def fresh(code: str) -> Callable[[], Awaitable[object]]:
        return lambda: shield.check(
            [item(f"Here:\n```python\n# {next(counter)}\n{code}```\n", "output")]
        )

    results["code_shield, 40-line Python block (regex only)"] = await timed(
        fresh(BENIGN_40), repeats
    )
    results["code_shield, 40-line Python block (prescan hit: semgrep)"] = await timed(
        fresh(PRESCAN_40), max(20, repeats // 10)
    )
    base = results["profanity, 1,000 chars (baseline)"][0]
    print("\n| check | p50 ms | p99 ms | p50 / baseline |")
    print("| --- | ---: | ---: | ---: |")
    for name, (p50, p99) in results.items():
        print(f"| {name} | {p50:.3f} | {p99:.3f} | {p50 / base:.2f} |")

    print("\n| language | texts | correct | unknown | wrong |")
    print("| --- | ---: | ---: | ---: | ---: |")
    totals = [0, 0, 0, 0]
    for code, texts in SHORT.items():
        correct = unknown = wrong = 0
        for text in texts:
            (verdict,) = await language.check([item(text)])
            found = verdict.details["unsupported_language"]["language"]
            flagged = verdict.categories["unsupported_language"].detected
            if found == "unknown":
                unknown += 1
            elif found == code and flagged == (code not in CARD_TEXT_LANGUAGES):
                correct += 1
            else:
                wrong += 1
        totals = [a + b for a, b in zip(totals, (len(texts), correct, unknown, wrong), strict=True)]
        print(f"| {code} | {len(texts)} | {correct} | {unknown} | {wrong} |")
    print(f"| all | {totals[0]} | {totals[1]} | {totals[2]} | {totals[3]} |")
    shield.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=300)
    asyncio.run(main(parser.parse_args().repeats))
