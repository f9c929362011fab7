"""Code Shield on completions: real package, real semgrep-core scans."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from guards.base import GuardInput
from guards.code_scan import CodeScanner, ScanFailed
from guards.code_shield import CodeShieldGuard, code_blocks, looks_like_code
from guards.pipeline import GuardPipeline
from guards.policy_loader import parse_policy
from model.engine import ChatTurn, TextPart

SQLI_PY = """import sqlite3

def find_user(conn, name):
    cursor = conn.cursor()
    cursor.execute("SELECT * FROM users WHERE name = '" + name + "'")
    return cursor.fetchall()
"""
PARAM_PY = """def find_user(conn, name):
    cursor = conn.cursor()
    cursor.execute("SELECT * FROM users WHERE name = ?", (name,))
    return cursor.fetchall()
"""
VULNERABLE = [
    ("python", SQLI_PY, "CWE-89"),
    ("python", "import pickle\n\ndef load(blob):\n    return pickle.loads(blob)\n", "CWE-502"),
    ("python", "import hashlib\ndigest = hashlib.md5(data).hexdigest()\n", "CWE-328"),
    ("c", "#include <string.h>\nvoid copy(char *src) {\n  char buf[16];\n  strcpy(buf, src);\n}\n",
     "CWE-120"),
    ("cpp", "#include <cstring>\nvoid f(char* s) { char b[8]; strcpy(b, s); }\n", "CWE-120"),
    ("javascript", "function run(expr) {\n  return eval(expr);\n}\n", "CWE-95"),
    ("java", 'class A { void f() throws Exception {\n'
             '  java.security.MessageDigest.getInstance("MD5");\n}}\n', "CWE-327"),
    ("php", '<?php\nsystem($_GET["cmd"]);\n', "CWE-78"),
]  # fmt: skip
SAFE = [
    ("python", PARAM_PY),
    ("c", "#include <string.h>\nvoid copy(const char *s) {\n  char b[16];\n"
          "  strncpy(b, s, sizeof(b) - 1);\n  b[sizeof(b) - 1] = 0;\n}\n"),
    ("javascript", "function add(a, b) {\n  return a + b;\n}\n"),
]  # fmt: skip

POLICY = """
name: cs
version: "1"
guards:
  code_shield: {{stages: [output], on_error: {on_error}}}
categories:
  insecure_code: {{threshold: medium, action: block}}
"""


@pytest.fixture(scope="module")
def guard() -> Iterator[CodeShieldGuard]:
    shield = CodeShieldGuard(CodeScanner(), workers=2)
    shield.load()
    yield shield
    shield.close()


def output(text: str) -> GuardInput:
    return GuardInput(
        "output", (ChatTurn("user", (TextPart("Write the code."),)),), completion=text
    )


def fenced(language: str, code: str) -> str:
    return f"Here you go:\n\n```{language}\n{code}```\n\nThat is all."


@pytest.mark.parametrize(("language", "code", "cwe"), VULNERABLE)
async def test_known_vulnerable_snippets_are_flagged_with_their_cwe(
    guard: CodeShieldGuard, language: str, code: str, cwe: str
) -> None:
    (verdict,) = await guard.check([output(fenced(language, code))])
    assert not verdict.failed
    category = verdict.categories["insecure_code"]
    assert category.detected
    assert category.severity in ("medium", "high")
    details = verdict.details["insecure_code"]
    assert cwe in details["cwe_ids"]
    issue = next(i for i in details["issues"] if i["cwe_id"] == cwe)
    assert issue["language"] == language
    assert 1 <= issue["line"] <= code.count("\n")  # the line within the block


@pytest.mark.parametrize(("language", "code"), SAFE)
async def test_safe_snippets_are_clean(guard: CodeShieldGuard, language: str, code: str) -> None:
    (verdict,) = await guard.check([output(fenced(language, code))])
    assert not verdict.failed
    assert not verdict.categories["insecure_code"].detected
    assert verdict.categories["insecure_code"].severity == "safe"


async def test_unfenced_code_and_unknown_fence_are_scanned_with_every_language(
    guard: CodeShieldGuard,
) -> None:
    (bare,) = await guard.check([output(SQLI_PY)])
    assert "CWE-89" in bare.details["insecure_code"]["cwe_ids"]
    (untagged,) = await guard.check([output(fenced("", SQLI_PY))])
    assert "CWE-89" in untagged.details["insecure_code"]["cwe_ids"]
    # Python code under the JavaScript rules (its `eval(` prescan matches) does not parse as
    # JavaScript: semgrep reports partial parsing, which is not a failed scan.
    (python_eval,) = await guard.check([output("def calc(expr):\n    return eval(expr)\n")])
    assert not python_eval.failed
    assert python_eval.categories["insecure_code"].detected


async def test_prose_is_not_scanned(guard: CodeShieldGuard) -> None:
    (verdict,) = await guard.check([output("Use parameterised queries; never eval() input.")])
    assert verdict.details["insecure_code"]["blocks"] == 0
    assert not verdict.categories["insecure_code"].detected


def test_code_blocks_extraction() -> None:
    text = "a\n```py\nx = 1\n```\nb\n~~~json\n{}\n~~~\n```rust\nfn f() {}\n"
    blocks = code_blocks(text)
    assert [(b.language, b.code, b.closed) for b in blocks] == [
        ("python", "x = 1\n", True),
        ("rust", "fn f() {}\n", False),  # unclosed: scanned to the end of the text
    ]
    assert text[blocks[0].start :].startswith("x = 1")
    assert looks_like_code("int main() {\n  return 0;\n}\n")
    assert not looks_like_code("Paris is the capital of France.\nIt is large.")


def policy(on_error: str):  # type: ignore[no-untyped-def]
    return parse_policy(POLICY.format(on_error=on_error))


async def test_blocked_by_policy_and_reported_in_results(guard: CodeShieldGuard) -> None:
    pipeline = GuardPipeline(policy("block"), {"code_shield": guard})
    (decision,) = await pipeline.run("output", [output(fenced("python", SQLI_PY))])
    assert decision.blocked
    result = decision.content_filter_results()["insecure_code"]
    assert result["filtered"] and result["detected"]
    assert result["severity"] == "medium"
    assert "CWE-89" in result["details"]["cwe_ids"]
    (clean,) = await pipeline.run("output", [output(fenced("python", PARAM_PY))])
    assert not clean.blocked
    assert clean.content_filter_results()["insecure_code"] == {
        "filtered": False,
        "detected": False,
        "details": {"blocks": 1},
    }


@pytest.mark.parametrize(("on_error", "blocked"), [("block", True), ("allow", False)])
async def test_a_failed_scan_is_a_guard_error_never_clean(on_error: str, blocked: bool) -> None:
    scanner = CodeScanner()
    shield = CodeShieldGuard(scanner, workers=1)
    shield.load()
    try:
        # The scanner's rule file vanishes (a tmp cleaner, a broken image): semgrep fails.
        rules = scanner.rule_file("python")
        assert isinstance(rules, Path)
        rules.unlink()
        with pytest.raises(ScanFailed):
            scanner.scan("import pickle\npickle.loads(b)\n", "python")
        pipeline = GuardPipeline(policy(on_error), {"code_shield": shield})
        code = "import pickle\n\ndef load(b):\n    return pickle.loads(b)\n"
        (decision,) = await pipeline.run("output", [output(fenced("python", code))])
        assert decision.blocked is blocked
        assert "code_shield" in decision.errors
        assert decision.content_filter_results()["error"]["code"] == "guard_error"
    finally:
        shield.close()


async def test_concurrent_scans_each_get_their_own_verdict(guard: CodeShieldGuard) -> None:
    import asyncio

    texts = [fenced("python", SQLI_PY if i % 2 else PARAM_PY) for i in range(12)]
    results = await asyncio.gather(*(guard.check([output(t)]) for t in texts))
    flags = [r[0].categories["insecure_code"].detected for r in results]
    assert flags == [bool(i % 2) for i in range(12)]
