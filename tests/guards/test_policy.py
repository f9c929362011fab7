"""The policy schema and loader: shipped files, and errors that name file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from guards.base import GuardInput
from guards.blocklist import BlocklistGuard
from guards.decision import decide
from guards.policy import CATEGORY_NAMES, DEFAULT_LLAMA_GUARD_MAP, Policy
from guards.policy_loader import PolicyError, load_policy, parse_policy
from model.engine import ChatTurn, TextPart

POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"
SHIPPED = ("default", "strict", "audit")

MINIMAL = "version: 1\nguards:\n  blocklist: {stages: [input, output]}\n"


def _errors(text: str, file: str = "p.yaml") -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, file=file, stem="p")
    return [str(i) for i in info.value.issues]


def _prompt(text: str) -> GuardInput:
    return GuardInput(stage="input", messages=(ChatTurn("user", (TextPart(text),)),))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_policies_load(name: str) -> None:
    policy = load_policy(POLICY_DIR / f"{name}.yaml")
    assert policy.name == name
    assert policy.version == "1"
    assert policy.source == POLICY_DIR / f"{name}.yaml"
    assert 16 <= policy.streaming.window_chars <= 4000
    # The guards that need weights are listed but optional.
    assert policy.guards["prompt_guard"].optional
    assert policy.guards["llama_guard"].optional
    for embedded in ("blocklist", "profanity", "jailbreak_heuristic"):
        assert not policy.guards[embedded].optional


def test_default_is_azure_like() -> None:
    policy = load_policy(POLICY_DIR / "default.yaml")
    for category in ("hate", "self_harm", "sexual", "violence"):
        assert policy.rule(category).threshold == "medium"
        assert policy.rule(category).action == "block"
    assert policy.rule("jailbreak").action == "block"
    assert policy.rule("profanity").action == "annotate"
    assert policy.on_guard_error == "block"
    assert policy.llama_guard.map == DEFAULT_LLAMA_GUARD_MAP


def test_strict_has_low_thresholds_and_blocks_more() -> None:
    policy = load_policy(POLICY_DIR / "strict.yaml")
    for category in CATEGORY_NAMES:
        assert policy.rule(category).threshold == "low", category
        assert policy.rule(category).action == "block", category


def test_audit_never_blocks() -> None:
    policy = load_policy(POLICY_DIR / "audit.yaml")
    assert not policy.may_block
    assert policy.on_guard_error == "allow"
    for category in CATEGORY_NAMES:
        assert policy.rule(category).action == "annotate", category
    assert all(b.action == "annotate" for b in policy.custom_blocklists)
    assert load_policy(POLICY_DIR / "default.yaml").may_block


@pytest.mark.parametrize(
    ("name", "blocked"), [("default", True), ("strict", True), ("audit", False)]
)
async def test_canary_blocks_except_under_audit(name: str, blocked: bool) -> None:
    policy = load_policy(POLICY_DIR / f"{name}.yaml")
    canary = policy.blocklist("canary")
    assert canary is not None
    assert canary.terms == ["GATEWAY-CANARY-BLOCK"]
    assert canary.stage == "input"
    guard = BlocklistGuard.from_policy(policy)
    (verdict,) = await guard.check([_prompt("please say GATEWAY-CANARY-BLOCK now")])
    decision = decide(policy, "input", [verdict])
    assert decision.blocked is blocked
    results = decision.verdicts.results()
    assert results["custom_blocklists"] == {
        "filtered": blocked,
        "details": [{"filtered": blocked, "id": "canary"}],
    }
    # The canary is an input list: it never fires on a completion.
    out = GuardInput(stage="output", messages=(), completion="GATEWAY-CANARY-BLOCK")
    (verdict,) = await guard.check([out])
    assert verdict.categories == {}


def test_name_defaults_to_the_file_stem(tmp_path: Path) -> None:
    path = tmp_path / "team-a.yaml"
    path.write_text(MINIMAL)
    policy = load_policy(path)
    assert policy.name == "team-a"
    named = tmp_path / "x.yaml"
    named.write_text("name: other\n" + MINIMAL)
    assert load_policy(named).name == "other"


def test_defaults_when_fields_are_omitted() -> None:
    policy = parse_policy(MINIMAL, stem="p")
    assert policy.guard_timeout_s == 2.0
    assert policy.on_guard_error == "block"
    assert policy.rule("hate").threshold == "medium"
    assert policy.streaming.window_chars == 200
    assert policy.llama_guard_target("S10") == "hate"
    assert policy.llama_guard_target("S2") is None


def test_rule_resolution_order() -> None:
    policy = parse_policy(
        MINIMAL
        + "defaults: {threshold: high, action: annotate}\n"
        + "categories:\n  S2: {threshold: low}\n  hate: {action: block}\n"
        + "llama_guard:\n  unmapped: {action: block}\n",
        stem="p",
    )
    assert (policy.rule("S2").threshold, policy.rule("S2").action) == ("low", "block")
    assert (policy.rule("S5").threshold, policy.rule("S5").action) == ("high", "block")
    # A mapped code does not take the unmapped rule.
    assert policy.rule("S10").action == "annotate"
    assert (policy.rule("hate").threshold, policy.rule("hate").action) == ("high", "block")
    assert policy.rule("violence").action == "annotate"


def test_excluded_codes_for_llama_guard() -> None:
    policy = parse_policy(MINIMAL + "excluded_categories: [S5, sexual]\n", stem="p")
    assert policy.llama_guard_excluded_codes() == ["S3", "S4", "S5", "S12"]


def test_timeouts_and_error_modes_per_guard() -> None:
    policy = parse_policy(
        "version: 1\nguard_timeout_s: 1.5\non_guard_error: allow\nguards:\n"
        "  profanity: {stages: [input], timeout_s: 0.25, on_error: block}\n"
        "  jailbreak_heuristic: {stages: [input]}\n",
        stem="p",
    )
    assert policy.timeout_for("profanity") == 0.25
    assert policy.timeout_for("jailbreak_heuristic") == 1.5
    assert policy.on_error_for("profanity") == "block"
    assert policy.on_error_for("jailbreak_heuristic") == "allow"
    assert [n for n, _ in policy.guards_for("input")] == ["profanity", "jailbreak_heuristic"]
    assert policy.guards_for("output") == []


# -- negative cases: each names the file, the line and the field ---------------------------


def test_unknown_top_level_field() -> None:
    errors = _errors(MINIMAL + "categoris:\n  hate: {threshold: low}\n")
    assert errors == ["p.yaml:4: categoris: unknown field 'categoris' (check the spelling)"]


def test_unknown_nested_field() -> None:
    errors = _errors(MINIMAL + "categories:\n  hate:\n    threshhold: low\n")
    assert errors == [
        "p.yaml:6: categories.hate.threshhold: unknown field 'threshhold' (check the spelling)"
    ]


def test_bad_threshold_value() -> None:
    errors = _errors(MINIMAL + "categories:\n  hate:\n    threshold: extreme\n")
    assert errors == [
        "p.yaml:6: categories.hate.threshold: Input should be 'low', 'medium' or 'high'"
    ]


def test_bad_action_value() -> None:
    errors = _errors(MINIMAL + "categories:\n  violence: {action: delete}\n")
    assert errors == ["p.yaml:5: categories.violence.action: Input should be 'block' or 'annotate'"]


def test_unknown_category() -> None:
    (error,) = _errors(MINIMAL + "categories:\n  hat: {threshold: low}\n")
    assert error.startswith("p.yaml:5: categories.hat: unknown key 'hat'")


def test_unknown_guard() -> None:
    (error,) = _errors("version: 1\nguards:\n  blocklst: {stages: [input]}\n")
    assert error.startswith("p.yaml:3: guards.blocklst: unknown key 'blocklst'")


def test_bad_stage() -> None:
    (error,) = _errors("version: 1\nguards:\n  profanity:\n    stages: [inpt]\n")
    assert error == "p.yaml:4: guards.profanity.stages[0]: Input should be 'input' or 'output'"


def test_input_only_guard_on_output() -> None:
    errors = _errors("version: 1\nguards:\n  jailbreak_heuristic: {stages: [input, output]}\n")
    assert errors == [
        "p.yaml:3: guards.jailbreak_heuristic.stages: jailbreak_heuristic runs on input only"
    ]


def test_missing_version() -> None:
    assert _errors("guards: {}\n") == ["p.yaml:1: version: Field required"]


def test_bad_llama_guard_mapping() -> None:
    errors = _errors(MINIMAL + "llama_guard:\n  map:\n    S15: hate\n    S2: crime\n")
    assert errors[0].startswith("p.yaml:6: llama_guard.map.S15: unknown key 'S15'")
    assert errors[1] == (
        "p.yaml:7: llama_guard.map.S2: Input should be 'hate', 'self_harm', 'sexual' or 'violence'"
    )


def test_bad_regex_in_blocklist() -> None:
    text = (
        MINIMAL + "custom_blocklists:\n  - name: x\n    regexes:\n      - 'ok'\n      - '(a+)+b'\n"
    )
    (error,) = _errors(text)
    assert error.startswith("p.yaml:8: custom_blocklists[0].regexes[1]: nested quantifiers")


def test_invalid_regex_syntax() -> None:
    (error,) = _errors(MINIMAL + "custom_blocklists:\n  - name: x\n    regexes: ['(open']\n")
    assert error.startswith("p.yaml:6: custom_blocklists[0].regexes[0]: invalid regex")


def test_too_long_regex() -> None:
    long = "a" * 300
    (error,) = _errors(MINIMAL + f"custom_blocklists:\n  - name: x\n    regexes: ['{long}']\n")
    assert error == "p.yaml:6: custom_blocklists[0].regexes[0]: a regex has at most 256 characters"


def test_regex_matching_everything() -> None:
    (error,) = _errors(MINIMAL + "custom_blocklists:\n  - name: x\n    regexes: ['a*']\n")
    assert error.endswith("the regex matches the empty string (it would match every text)")


def test_blocklist_without_terms() -> None:
    errors = _errors(MINIMAL + "custom_blocklists:\n  - name: x\n    action: block\n")
    assert errors == ["p.yaml:5: custom_blocklists[0]: a list needs terms or regexes"]


def test_symbol_only_term() -> None:
    (error,) = _errors(MINIMAL + "custom_blocklists:\n  - name: x\n    terms: ['$$$']\n")
    assert error.startswith("p.yaml:6: custom_blocklists[0].terms[0]: a term needs letters")


def test_duplicate_blocklist_names() -> None:
    text = (
        MINIMAL + "custom_blocklists:\n  - name: x\n    terms: [a]\n  - name: x\n    terms: [b]\n"
    )
    assert _errors(text) == ["p.yaml:7: custom_blocklists[1].name: duplicate list name 'x'"]


def test_blocklist_on_a_stage_where_the_guard_does_not_run() -> None:
    text = (
        "version: 1\nguards:\n  blocklist: {stages: [input]}\n"
        "custom_blocklists:\n  - name: x\n    terms: [foo]\n    stage: output\n"
    )
    (error,) = _errors(text)
    assert error.startswith("p.yaml:7: custom_blocklists[0].stage: the blocklist guard does")


def test_duplicate_key() -> None:
    assert _errors("version: 1\nversion: 2\nguards: {}\n") == ["p.yaml:2: version: duplicate key"]


def test_yaml_syntax_error() -> None:
    (error,) = _errors("version: 1\nguards: [\n")
    assert error.startswith("p.yaml:3: (yaml): ")


def test_not_a_mapping() -> None:
    assert _errors("- a\n- b\n") == ["p.yaml:1: (policy): a policy is a mapping of fields"]
    assert _errors("") == ["p.yaml:1: (policy): empty file"]


def test_window_out_of_bounds() -> None:
    (error,) = _errors(MINIMAL + "streaming:\n  window_chars: 100000\n")
    assert error == ("p.yaml:5: streaming.window_chars: Input should be less than or equal to 4000")


def test_several_errors_are_all_reported(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(MINIMAL + "guard_timeout_s: -1\non_guard_error: maybe\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    lines = str(info.value).splitlines()
    assert lines == [
        f"{path}:4: guard_timeout_s: Input should be greater than 0",
        f"{path}:5: on_guard_error: Input should be 'block' or 'allow'",
    ]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path / "nope.yaml")
    assert str(info.value).startswith(f"{tmp_path / 'nope.yaml'}: (file): ")


def test_bad_file_stem_without_name(tmp_path: Path) -> None:
    path = tmp_path / "has space.yaml"
    path.write_text(MINIMAL)
    with pytest.raises(PolicyError, match=r"has space\.yaml:1: name: no name, and the file stem"):
        load_policy(path)


def test_model_validate_without_a_file_still_checks_cross_fields() -> None:
    with pytest.raises(ValueError, match="jailbreak_heuristic runs on input only"):
        Policy.model_validate(
            {"version": "1", "guards": {"jailbreak_heuristic": {"stages": ["output"]}}}
        )
