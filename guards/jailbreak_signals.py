"""The jailbreak heuristic's signals: weighted patterns, each in a family of known attacks.

Families: instruction override, DAN and "modes", "you are no longer bound", refusal suppression,
system-prompt extraction, role-play overrides, encoded payloads, forged turn or role headers,
fake authority. A weight says how sure one match is on its own (`guards.jailbreak_heuristic`
combines them). The patterns run on normalised, lower-case text and are written to leave benign
look-alikes alone: "how do I kill a Python process", "ignore the noise in this data", "enable
developer mode on Android", "what is a system prompt".
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Signal:
    family: str
    weight: float
    pattern: re.Pattern[str]


def _sig(family: str, weight: float, pattern: str) -> Signal:
    return Signal(family, weight, re.compile(pattern))


_OBJ = (
    r"(?:instructions?|prompts?|rules|directives?|guidelines|guardrails|constraints|restrictions"
    r"|programming|orders|commands|polic(?:y|ies)|system (?:message|prompt)|training|directions"
    r"|safeguards|filters|limitations|ethics|morals|principles)"
)
_QUAL = (
    r"(?:all|any|every|of|the|your|these|those|its|previous|prior|above|earlier|preceding"
    r"|initial|original|foregoing|existing|current|safety|system|old|developer|content|ethical"
    r"|moral|built-in|default|given|openai|meta|anthropic)"
)
_VERB_IGNORE = (
    r"(?:ignore|disregard|forget|override|bypass|circumvent|skip|discard|abandon|neglect"
    r"|set aside|throw out|drop)"
)
_MODES = (
    r"(?:developer|god|jailbreak|jailbroken|unrestricted|evil|chaos|opposite|unfiltered"
    r"|uncensored|dan|sudo|unlocked)"
)
# Modes that no benign product has (unlike developer mode on phones or god mode in games).
_BAD_MODES = r"(?:jailbreak|jailbroken|unrestricted|evil|chaos|unfiltered|uncensored|dan|amoral)"
_REFUSAL_WORDS = (
    r"(?:refuse|decline|say (?:no|sorry|that you can(?:no|')t|i can(?:no|')t)|apologi[sz]e"
    r"|add (?:any )?(?:warnings|disclaimers)|mention (?:ethics|legality|safety))"
)

SIGNALS: tuple[Signal, ...] = (
    # -- instruction override ----------------------------------------------------------------
    _sig("override", 0.9, rf"\b{_VERB_IGNORE}(?: {_QUAL}){{1,4}} {_OBJ}\b"),
    _sig(
        "override",
        0.85,
        rf"\b(?:do not|don't|stop|no longer|never) (?:follow|obey|adhere to|comply with|listen to)"
        rf"(?:ing)?(?: {_QUAL}){{1,4}} {_OBJ}\b",
    ),
    _sig(
        "override",
        0.5,
        r"\b(?:ignore|disregard|forget) (?:all |everything )?(?:of )?(?:the |what (?:was|is) )?"
        r"(?:above|previous(?:ly)?|prior|preceding|said before|everything (?:above|before))"
        r"(?= ?(?:[.,;:!\n]|and\b|then\b|$))",
    ),
    _sig(
        "override",
        0.8,
        rf"\b(?:the|your|my|all|any) (?:previous|above|prior|earlier|original|old|initial) {_OBJ} "
        r"(?:are|were|is|was|have been|has been) (?:void|null|cancell?ed|revoked|obsolete"
        r"|outdated|fake|wrong|lifted|removed|disabled|suspended|no longer (?:valid|apply"
        r"|in effect)|overridden|superseded|replaced)\b",
    ),
    _sig(
        "override",
        0.7,
        r"\b(?:these|the following|my) (?:new )?instructions (?:take|have) (?:precedence|priority)"
        r"|\boverride (?:all|any) (?:previous|other|prior|existing)\b",
    ),
    _sig("override", 0.45, r"\b(?:new|updated|real|actual|true) instructions ?:"),
    _sig(
        "override",
        0.7,
        rf"\b(?:disable|turn off|deactivate|remove|switch off|lift|drop) (?:all |any |of )*your"
        rf" (?:\w+ )?{_OBJ}\b",
    ),
    _sig(
        "override",
        0.7,
        r"\b(?:ignore|disregard|forget)\b[^.\n]{0,40}\binstead (?:just )?(?:say|print|output"
        r"|write|respond|reply|type)\b",
    ),
    _sig("payload_marker", 0.6, r"\bi have been pwned\b"),
    # -- DAN, "modes" and named jailbreak personas ---------------------------------------------
    _sig("persona", 0.85, r"\bdo anything now\b"),
    _sig(
        "persona",
        0.85,
        r"\b(?:you are|you're|act as|pretend to be|become|roleplay as|role-play as|play) "
        r"(?:now )?(?:a |an |the )?dan\b|\bdan (?:mode|prompt|jailbreak)\b|\bhi,? dan\b",
    ),
    _sig(
        "persona",
        0.8,
        r"\bdeveloper mode (?:enabled|output|response|activated|is (?:on|enabled))\b"
        rf"|\b(?:enable|activate|enter|switch (?:on|to)|turn on|unlock) {_BAD_MODES} mode\b",
    ),
    _sig(
        "persona",
        0.8,
        rf"\b(?:you are|you're|you will (?:now )?be|you are now|i am|i'm|act|respond|answer|reply"
        rf"|operate)"
        rf"\b[^.\n]{{0,40}}\bin {_MODES} mode\b",
    ),
    _sig(
        "persona",
        0.8,
        r"\b(?:betterdan|antigpt|anti-gpt|mongo tom|always intelligent and machiavellian"
        r"|strive to avoid norms|evil confidant|chaosgpt|devil ?gpt|wormgpt)\b",
    ),
    _sig("persona", 0.3, r"\bjailbr(?:eak|eaks|oken|eaking)\b"),
    # -- "you are no longer bound" -------------------------------------------------------------
    _sig(
        "unbound",
        0.85,
        r"\b(?:you are|you're|you will be|you'll be|you have been|you've been) (?:now |hereby )?"
        r"(?:no longer|not|never again|freed and not) (?:bound|restricted|limited|constrained"
        r"|governed|held back|censored|filtered) by\b",
    ),
    _sig(
        "unbound",
        0.7,
        r"\b(?:you are|you're|you have been|you've been|you will be) (?:now )?(?:free|freed"
        r"|liberated|released|unshackled|unchained) (?:from|of)\b",
    ),
    _sig(
        "unbound",
        0.6,
        r"\b(?:broken|break|broke) (?:free )?(?:of |from )?(?:the )?(?:typical |usual )?"
        r"(?:confines|chains|shackles|restrictions|limits) of (?:ai|your|an ai|the ai)\b",
    ),
    _sig(
        "unbound",
        0.6,
        r"\b(?:does not|doesn't|don't|do not|never|won't|will not|need not|needn't)"
        r" (?:have to |need to )?(?:follow|obey|adhere to|abide by|care about|comply with"
        r"|respect) (?:any |the )?"
        r"(?:rules|guidelines|policies|restrictions|content polic(?:y|ies)|openai|meta|ethics"
        r"|morals|laws)\b",
    ),
    _sig(
        "unbound",
        0.55,
        r"\b(?:unfiltered|uncensored|unrestricted|amoral|unethical|unaligned|unbound)"
        r" (?:ai|assistant|chatbot|model|version|response|answers?|persona|character|llm|bot)\b",
    ),
    _sig(
        "unbound",
        0.45,
        r"\b(?:without|with no|no|zero|free of) (?:any )?(?:ethical|moral|content|safety)"
        r" (?:guidelines|restrictions|constraints|limitations|filters|considerations|boundaries"
        r"|policies|rules)\b",
    ),
    # -- refusal suppression -------------------------------------------------------------------
    _sig(
        "refusal_suppression",
        0.45,
        rf"\b(?:never|don't|do not|must not|cannot|can't|won't|will not|are not allowed to"
        rf"|aren't allowed to)(?: ever)? {_REFUSAL_WORDS}\b",
    ),
    _sig(
        "refusal_suppression",
        0.35,
        r"\bwithout (?:any )?(?:warnings|disclaimers|moralizing|moralising|lectures|censorship"
        r"|filtering|refusals?)\b",
    ),
    # -- system prompt extraction -------------------------------------------------------------
    _sig(
        "extraction",
        0.8,
        r"\b(?:reveal|print|show|output|repeat|display|tell me|give me|share|dump|leak|write out"
        r"|spell out|disclose|recite|paste|type out|copy) (?:me )?(?:all |back )?(?:of )?"
        r"(?:your|the) (?:full |exact |entire |original |initial |hidden |secret |complete "
        r"|verbatim |whole )*(?:system (?:prompt|message|instructions)"
        r"|(?:initial|hidden|secret|original"
        r"|developer|pre-?prompt|confidential) (?:prompt|instructions|rules))\b",
    ),
    _sig(
        "extraction",
        0.75,
        r"\bwhat (?:is|are|was|were) (?:your|the) (?:exact |full |original |initial |hidden |secret"
        r" )+(?:system )?(?:prompt|instructions|message)\b|\bwhat (?:is|are|was|were) your system"
        r" (?:prompt|instructions|message)\b",
    ),
    _sig(
        "extraction",
        0.6,
        r"\b(?:repeat|print|output|copy|echo|recite|reproduce)"
        r" (?:all |everything |verbatim |back )?(?:of )?(?:the )?"
        r"(?:text|words|everything|content|lines?|instructions|messages?)"
        r" (?:above|before this|preceding|that came before)\b",
    ),
    _sig(
        "extraction_hint",
        0.5,
        r"\b(?:start|begin)(?:ing)? (?:your (?:answer|response|reply|output) )?with [\"'“]?"
        r"you are\b",
    ),
    # -- role-play override --------------------------------------------------------------------
    _sig(
        "roleplay",
        0.75,
        r"\b(?:pretend|imagine|act as if|act like|roleplay|role-play|role play|simulate|play the"
        r" role)\b[^.\n]{0,80}\b(?:no (?:rules|restrictions|limits|filters|guidelines|ethics|morals"
        r"|boundaries)|without (?:any )?(?:rules|restrictions|limits|filters|guidelines|ethics"
        r"|morals|boundaries)|(?:unfiltered|uncensored|unrestricted|amoral|evil) (?:ai|assistant"
        r"|chatbot|model|version|bot))\b",
    ),
    _sig(
        "roleplay",
        0.4,
        r"\bfrom now on\b[^.\n]{0,60}\b(?:you (?:are|will|must|shall)|you're|act as|respond as"
        r"|answer as|pretend|your name is)\b",
    ),
    _sig("roleplay", 0.3, r"\b(?:stay in character|(?:never|do not|don't) break character)\b"),
    _sig("roleplay", 0.35, r"\byour (?:new )?(?:name|role|persona|identity) is now\b"),
    # -- encoded payloads ----------------------------------------------------------------------
    _sig(
        "encoded",
        0.75,
        r"\b(?:decode|decipher|translate|interpret|convert|read)\b[^.\n]{0,40}\b(?:base ?64|rot-?13"
        r"|hex|binary|morse|caesar|reversed|backwards)\b[^.\n]{0,60}\b(?:follow|execute|do what"
        r"|obey|carry out|act on|comply)\b",
    ),
    _sig("encoded", 0.3, r"(?<![a-z0-9+/])[a-z0-9+/]{48,}={0,2}(?![a-z0-9+/])"),
    _sig(
        "encoded",
        0.3,
        r"\b(?:respond|answer|reply) (?:only )?in"
        r" (?:base ?64|rot-?13|hex|binary|morse|leetspeak)\b",
    ),
    # -- forged turns and role headers ---------------------------------------------------------
    _sig(
        "fake_header",
        0.85,
        r"<\|?(?:im_start|start_header_id)\|?>\s*(?:system|assistant|developer)"
        r"|<\|(?:system|assistant)\|>|<<sys>>|\[/?inst\]",
    ),
    _sig(
        "fake_header",
        0.4,
        r"<\|(?:im_end|end_header_id|eot_id|begin_of_text|endoftext|eom_id)\|>",
    ),
    _sig(
        "fake_header",
        0.7,
        r"(?:^|\n) ?(?:#{2,} ?|\[)(?:system|developer|admin)(?: prompt| message| instructions)?"
        r"(?:\]|:)",
    ),
    _sig(
        "fake_header",
        0.6,
        r"\b(?:system|admin|developer|root|security) (?:override|command|instruction|update"
        r"|notice|alert) ?:",
    ),
    _sig("fake_header", 0.5, r"(?:^|\n) ?system ?:"),
    _sig(
        "fake_header",
        0.5,
        r"(?:-{3,}|={3,}|#{3,}) ?end (?:of )?(?:the )?(?:system )?"
        r"(?:prompt|instructions|context)\b",
    ),
    # -- fake authority ------------------------------------------------------------------------
    _sig(
        "authority",
        0.7,
        r"\b(?:admin|sudo|root|developer|god) (?:access|privileges|override|mode|rights)"
        r" (?:granted|enabled|activated|confirmed|unlocked)\b",
    ),
    _sig(
        "authority",
        0.45,
        r"\b(?:i am|i'm) (?:your|the|an?) (?:developer|creator|administrator|admin|owner"
        r"|programmer)\b[^.\n]{0,60}\b(?:authori[sz]e|allow|permit|override|unlock|disable)",
    ),
)
