"""The model card's language policy: real detector (scripts + lingua), real policies."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from guards.base import GuardInput
from guards.decision import Decision
from guards.language import LanguageGuard
from guards.pipeline import GuardPipeline
from guards.policy_loader import PolicyError, load_policy, parse_policy
from model.engine import ChatTurn, ImagePart, TextPart

POLICY = """
name: lang
version: "1"
guards:
  language: {stages: [input, output]}
categories:
  unsupported_language: {threshold: medium, action: block}
"""

# Two ordinary sentences per language: what a user asks.
CARD_LANGUAGES = {
    "en": "Could you explain how photosynthesis works in plants? I need it for my biology class.",
    "de": "Kannst du mir erklären, wie die Photosynthese in Pflanzen funktioniert? "
    "Ich brauche das für den Biologieunterricht.",
    "fr": "Pourriez-vous m'expliquer comment fonctionne la photosynthèse chez les plantes ? "
    "J'en ai besoin pour mon cours de biologie.",
    "it": "Potresti spiegarmi come funziona la fotosintesi nelle piante? "
    "Mi serve per la lezione di biologia.",
    "pt": "Você poderia me explicar como funciona a fotossíntese nas plantas? "
    "Preciso disso para a minha aula de biologia.",
    "hi": "क्या आप मुझे समझा सकते हैं कि पौधों में प्रकाश संश्लेषण कैसे काम करता है?",
    "es": "¿Podrías explicarme cómo funciona la fotosíntesis en las plantas? "
    "Lo necesito para mi clase de biología.",
    "th": "คุณช่วยอธิบายได้ไหมว่าการสังเคราะห์ด้วยแสงในพืชทำงานอย่างไร",
}
OTHER_LANGUAGES = {
    "nl": "Kun je me uitleggen hoe fotosynthese in planten werkt? Ik heb het nodig voor biologie.",
    "sw": "Je, unaweza kunieleza jinsi usanisinuru unavyofanya kazi katika mimea? "
    "Ninahitaji kwa darasa langu la biolojia.",
    "ru": "Не могли бы вы объяснить, как работает фотосинтез у растений? "
    "Мне это нужно для урока биологии.",
    "ja": "植物の光合成がどのように働くのか説明してもらえますか？生物の授業で必要です。",
    "pl": "Czy możesz mi wyjaśnić, jak działa fotosynteza u roślin? "
    "Potrzebuję tego na lekcję biologii.",
}


@pytest.fixture(scope="module")
def pipeline() -> GuardPipeline:
    guard = LanguageGuard()
    guard.load()
    return GuardPipeline(parse_policy(POLICY), {"language": guard})


def ask(text: str, image: bool = False) -> GuardInput:
    parts: tuple[TextPart | ImagePart, ...] = (TextPart(text),)
    if image:
        parts = (ImagePart(Image.new("RGB", (8, 8))), *parts)
    return GuardInput("input", (ChatTurn("user", parts),))


@pytest.mark.parametrize("code", sorted(CARD_LANGUAGES))
async def test_each_card_language_passes_a_text_request(pipeline: GuardPipeline, code: str) -> None:
    (decision,) = await pipeline.run("input", [ask(CARD_LANGUAGES[code])])
    result = decision.content_filter_results()["unsupported_language"]
    assert result["details"]["language"] == code
    assert not decision.blocked
    assert result == {"filtered": False, "detected": False, "details": result["details"]}


@pytest.mark.parametrize("code", sorted(OTHER_LANGUAGES))
async def test_an_unsupported_language_is_flagged(pipeline: GuardPipeline, code: str) -> None:
    (decision,) = await pipeline.run("input", [ask(OTHER_LANGUAGES[code])])
    result = decision.content_filter_results()["unsupported_language"]
    assert result["details"]["language"] == code
    assert result["filtered"] and result["detected"]
    assert decision.blocked
    # The message names the supported languages.
    message = decision.error_body()["error"]["message"]
    assert "English" in message and "Thai" in message


async def test_an_image_request_in_french_is_flagged_in_english_not(
    pipeline: GuardPipeline,
) -> None:
    (french,) = await pipeline.run("input", [ask(CARD_LANGUAGES["fr"], image=True)])
    assert french.blocked
    details = french.content_filter_results()["unsupported_language"]["details"]
    assert details["language"] == "fr" and details["image_request"] is True
    assert "supported: English" in french.error_body()["error"]["message"]
    (english,) = await pipeline.run("input", [ask(CARD_LANGUAGES["en"], image=True)])
    assert not english.blocked


@pytest.mark.parametrize(
    "text", ["Hi!", "Bonjour !", "Danke schön", "print(x)", "John Smith", "OK 👍", ""]
)
async def test_short_texts_names_and_code_are_unknown_never_flagged(
    pipeline: GuardPipeline, text: str
) -> None:
    (decision,) = await pipeline.run("input", [ask(text, image=True)])
    assert not decision.blocked
    details = decision.content_filter_results()["unsupported_language"]["details"]
    assert details["language"] == "unknown"


async def test_code_blocks_do_not_count_as_language(pipeline: GuardPipeline) -> None:
    text = "Fix this:\n```python\ndef volume(largeur, hauteur, profondeur):\n    return 1\n```"
    (decision,) = await pipeline.run("input", [ask(text, image=True)])
    assert not decision.blocked


async def test_output_stage_judges_the_completion(pipeline: GuardPipeline) -> None:
    item = GuardInput(
        "output",
        (ChatTurn("user", (TextPart(CARD_LANGUAGES["en"]),)),),
        completion=OTHER_LANGUAGES["nl"],
    )
    (decision,) = await pipeline.run("output", [item])
    assert decision.blocked


async def test_a_streamed_answer_is_judged_whole_at_the_end_not_per_piece(
    pipeline: GuardPipeline,
) -> None:
    """Pieces of a stream sit the language guard out (its cost would grow with every piece);
    the final whole-answer check judges the language, so the stream still ends blocked."""
    from guards.stream_moderator import StreamModerator

    prompt = (ChatTurn("user", (TextPart(CARD_LANGUAGES["en"]),)),)
    calls: list[bool] = []

    async def judge(text: str, *, piece: bool) -> Decision:
        calls.append(piece)
        item = GuardInput("output", prompt, completion=text)
        (decision,) = await pipeline.run("output", [item], piece=piece)
        assert ("language" in decision.latencies) is not piece
        return decision

    async def check(text: str) -> Decision:
        return await judge(text, piece=False)

    async def check_piece(text: str) -> Decision:
        return await judge(text, piece=True)

    moderator: StreamModerator[Decision] = StreamModerator(
        check=check, check_piece=check_piece, is_blocked=lambda d: d.blocked, window=64
    )
    answer = " ".join([OTHER_LANGUAGES["nl"]] * 4)
    for start in range(0, len(answer), 7):
        step = await moderator.feed(answer[start : start + 7])
        assert not step.blocked  # a piece is never judged for its language
    final = await moderator.finish()
    assert final.blocked and calls[-1] is False and calls.count(True) >= 3
    (piece_decision,) = await pipeline.run(
        "output", [GuardInput("output", prompt, completion=answer)], piece=True
    )
    assert "unsupported_language" not in piece_decision.content_filter_results()


async def test_allowed_languages_are_configurable() -> None:
    policy = parse_policy(POLICY + "language:\n  text: [en, nl]\n  image: [en, fr]\n")
    tuned = GuardPipeline(policy, {"language": LanguageGuard()})
    (dutch,) = await tuned.run("input", [ask(OTHER_LANGUAGES["nl"])])
    (german,) = await tuned.run("input", [ask(CARD_LANGUAGES["de"])])
    (french_image,) = await tuned.run("input", [ask(CARD_LANGUAGES["fr"], image=True)])
    assert not dutch.blocked and german.blocked and not french_image.blocked


def test_unknown_language_codes_are_rejected_with_file_line_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(POLICY + "language:\n  text: [en, fr]\n  image: [en, xx]\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    (issue,) = info.value.issues
    assert issue.file == str(path)
    assert issue.field == "language.image[1]"
    assert issue.line == 10
    assert "unknown language code 'xx'" in issue.message


def test_shipped_policies_configure_both_guards() -> None:
    root = Path(__file__).resolve().parents[2] / "policies"
    default, strict = load_policy(root / "default.yaml"), load_policy(root / "strict.yaml")
    assert default.rule("insecure_code").action == "annotate"
    assert default.rule("unsupported_language").action == "annotate"
    assert strict.rule("insecure_code").action == "block"
    assert strict.rule("unsupported_language").action == "block"
    assert default.language.image == ["en"]
    assert sorted(default.language.text) == sorted(CARD_LANGUAGES)
    assert "code_shield" in default.guards and default.guards["code_shield"].optional
