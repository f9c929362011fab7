"""Meta's insecure-code detector (PyPI `codeshield`), run so that a failed scan is an error.

What runs, per code block and language (C, C++, C#, Java, JavaScript, PHP, Python, Rust):

- the package's **regex rules** of its `cyberseceval` use case (broader than the `codeshield`
  use case: it also knows `strcpy`, PHP and Rust rules; microseconds), compiled once;
- its **semgrep rules** of the `codeshield` use case, only when one of that rule set's prescan
  regexes matches (Meta's fast path: most code never starts semgrep). The `semgrep-core` binary
  of the `semgrep` package runs directly (`semgrep-core -rules R -lang L FILE -json`), one
  process per scan, with a timeout. `CodeShield.scan_code` is not used: it swallows every
  failure and answers "not insecure", and its `osemgrep` path writes a symlink into
  site-packages.

A scan that cannot complete (semgrep missing, non-zero exit, unparseable output, a rule error,
a timeout) raises `ScanFailed`; it never reads as clean. Rules that the installed semgrep cannot
parse (semgrep 1.79 rejects one Java rule, `ssrf_insecure_patterns`) are found by a self-check
at load, dropped and listed in `dropped_rules`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

LANGUAGES = ("c", "cpp", "csharp", "java", "javascript", "php", "python", "rust")
_EXTENSIONS = {
    "c": ".c", "cpp": ".cpp", "csharp": ".cs", "java": ".java", "javascript": ".js",
    "php": ".php", "python": ".py", "rust": ".rs",
}  # fmt: skip
REGEX_USECASE = "cyberseceval"
SEMGREP_USECASE = "codeshield"


class CodeShieldUnavailable(RuntimeError):
    """The optional extra is not installed: `pip install '.[codeshield]'`."""


class ScanFailed(RuntimeError):
    """A scan did not complete: the code is not known to be clean."""


@dataclass(frozen=True)
class Issue:
    cwe_id: str
    rule: str
    line: int | None
    severity: str  # "error" | "warning" | "advice"
    analyzer: str  # "regex" | "semgrep"
    language: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "cwe_id": self.cwe_id,
            "rule": self.rule,
            "line": self.line,
            "severity": self.severity,
            "analyzer": self.analyzer,
            "language": self.language,
        }


@dataclass(frozen=True)
class _Pattern:
    regex: re.Pattern[str]
    cwe_id: str
    rule: str
    severity: str


@dataclass
class _LanguageRules:
    regexes: list[_Pattern] = field(default_factory=list)
    prescan: list[re.Pattern[str]] = field(default_factory=list)
    semgrep_rules: Path | None = None


def _is_comment(line: str) -> bool:
    stripped = line.strip()
    return stripped.startswith(("#", "//", "/*")) or stripped.endswith("*/")


class CodeScanner:
    """Thread-safe after `load()`; scans of the same block and language are cached."""

    def __init__(self, *, semgrep_timeout_s: float = 10.0, cache_entries: int = 512) -> None:
        self.semgrep_timeout_s = semgrep_timeout_s
        self.cache_entries = cache_entries
        self.dropped_rules: dict[str, list[str]] = {}
        self._rules: dict[str, _LanguageRules] = {}
        self._semgrep: Path | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._load_lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], list[Issue]] = OrderedDict()
        self._cache_lock = threading.Lock()

    # -- loading -------------------------------------------------------------------------------

    def load(self) -> None:
        with self._load_lock:
            if self._rules:
                return
            root = _rules_root()
            self._semgrep = _semgrep_core()
            self._workdir = tempfile.TemporaryDirectory(prefix="code-shield-")
            config = yaml.safe_load((root / "config.yaml").read_text())["config"]
            rules: dict[str, _LanguageRules] = {}
            for name in LANGUAGES:
                entry = _LanguageRules(regexes=_regex_rules(root, config[REGEX_USECASE], name))
                source = root / "semgrep" / "_generated_" / f"{name}_{SEMGREP_USECASE}.json"
                if source.exists():
                    data = json.loads(source.read_text())
                    entry.prescan = [
                        re.compile(r["metadata"]["prescan_regex"])
                        for r in data.get("rules", [])
                        if "prescan_regex" in r.get("metadata", {})
                    ]
                    entry.semgrep_rules = self._checked_rules(name, source)
                rules[name] = entry
            self._rules = rules

    def _checked_rules(self, language: str, source: Path) -> Path:
        """The rule file, minus the rules this semgrep cannot parse (found by one dry run)."""
        assert self._workdir is not None
        data = json.loads(source.read_text())
        target = Path(self._workdir.name) / f"selfcheck{_EXTENSIONS[language]}"
        target.write_text("\n")
        out = self._run_semgrep(source, language, target, allow_rule_errors=True)
        broken = sorted({str(e.get("rule_id")) for e in out.get("errors", []) if e.get("rule_id")})
        if broken:
            self.dropped_rules[language] = broken
            data["rules"] = [r for r in data.get("rules", []) if r.get("id") not in broken]
        # The scanner's own copy: what it checked is what it runs.
        checked = Path(self._workdir.name) / source.name
        checked.write_text(json.dumps(data))
        self._run_semgrep(checked, language, target)  # must now run clean, else fail
        return checked

    def rule_file(self, language: str) -> Path | None:
        """The semgrep rule file a language's scans run (the scanner's checked copy)."""
        self.load()
        return self._rules[language].semgrep_rules

    # -- scanning -----------------------------------------------------------------------------

    def scan(self, code: str, language: str | None) -> list[Issue]:
        """Issues in one block; `language` None: every supported language's rules."""
        self.load()
        languages = [language] if language in self._rules else list(LANGUAGES)
        key = (language or "*", code)
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        issues: list[Issue] = []
        for name in languages:
            issues.extend(self._scan_language(code, name))
        with self._cache_lock:
            self._cache[key] = issues
            while len(self._cache) > self.cache_entries:
                self._cache.popitem(last=False)
        return issues

    def _scan_language(self, code: str, language: str) -> list[Issue]:
        rules = self._rules[language]
        found: list[Issue] = []
        for pattern in rules.regexes:
            match = pattern.regex.search(code)
            if match is None:
                continue
            before = code[: match.start()].split("\n")
            if before and _is_comment(before[-1]):
                continue
            line = len(before)
            found.append(
                Issue(pattern.cwe_id, pattern.rule, line, pattern.severity, "regex", language)
            )
        if rules.semgrep_rules is not None and any(p.search(code) for p in rules.prescan):
            found.extend(self._semgrep_scan(code, language, rules.semgrep_rules))
        return found

    def _semgrep_scan(self, code: str, language: str, rule_file: Path) -> list[Issue]:
        assert self._workdir is not None
        fd, name = tempfile.mkstemp(suffix=_EXTENSIONS[language], dir=self._workdir.name)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(code)
            out = self._run_semgrep(rule_file, language, Path(name))
        finally:
            os.unlink(name)
        issues = []
        for result in out.get("results", []):
            extra = result.get("extra", {})
            issues.append(
                Issue(
                    cwe_id=str(extra.get("metadata", {}).get("cwe_id", "")),
                    rule=str(result.get("check_id", "")),
                    line=result.get("start", {}).get("line"),
                    severity=str(extra.get("severity", "warning")).lower(),
                    analyzer="semgrep",
                    language=language,
                )
            )
        return issues

    def _run_semgrep(
        self, rules: Path, language: str, target: Path, *, allow_rule_errors: bool = False
    ) -> dict[str, Any]:
        assert self._semgrep is not None
        command = [str(self._semgrep), "-rules", str(rules), "-lang", language]
        command += [str(target), "-json", "-timeout", f"{self.semgrep_timeout_s:g}"]
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                timeout=self.semgrep_timeout_s + 5,
                check=False,
                env={"PATH": os.environ.get("PATH", ""), "HOME": self._workdir.name}  # type: ignore[union-attr]
                | {"SEMGREP_SEND_METRICS": "off"},
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ScanFailed(f"semgrep did not run: {exc}") from exc
        try:  # semgrep-core prints progress dots before its JSON
            out: dict[str, Any] = json.loads(done.stdout[done.stdout.find(b"{") :])
        except ValueError:
            out = {}
        errors = [e for e in out.get("errors", []) if isinstance(e, dict)]
        rule_errors = [e for e in errors if e.get("rule_id")]
        if allow_rule_errors and rule_errors:
            return out
        if done.returncode != 0 or "results" not in out:
            tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
            raise ScanFailed(f"semgrep exited {done.returncode}: {' '.join(tail)[:200]}")
        # Target parse errors (code that does not parse in that language) are not failures:
        # semgrep still matched what it could. Rule errors and timeouts are.
        fatal = [e for e in errors if _fatal(e)]
        if fatal:
            raise ScanFailed(f"semgrep error: {str(fatal[0].get('message', fatal[0]))[:200]}")
        return out

    def close(self) -> None:
        if self._workdir is not None:
            self._workdir.cleanup()


# semgrep-core's error types for code that does not (fully) parse in the language asked: the
# rules matched what parsed. Anything else (rule errors, timeouts, out of memory) is fatal.
_TARGET_PARSE_ERRORS = frozenset(
    {"PartialParsing", "ParseError", "LexicalError", "SyntaxError", "OtherParseError",
     "AstBuilderError", "Syntax error", "Lexical error", "Partial parsing", "Other syntax error"}
)  # fmt: skip


def _fatal(error: dict[str, Any]) -> bool:
    if error.get("rule_id"):
        return True
    kind = error.get("error_type")
    name = kind[0] if isinstance(kind, list) and kind else str(kind)
    return name not in _TARGET_PARSE_ERRORS


def _rules_root() -> Path:
    """The `rules/` folder of the codeshield package, found without importing it (its import
    writes a symlink into site-packages, which fails where that is read-only)."""
    import importlib.util

    spec = importlib.util.find_spec("codeshield")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "insecure_code_detector" / "rules"
        if (candidate / "config.yaml").is_file():
            return candidate
    raise CodeShieldUnavailable("codeshield is not installed: pip install '.[codeshield]'")


def _regex_rules(root: Path, config: dict[str, Any], language: str) -> list[_Pattern]:
    """The package's regex rules for a language, as its own loader selects them: a rule with a
    `pattern_id` only when the use case enables it; C rules count for C++; the
    language-agnostic rules for every language but C++ (which gets them through C)."""
    own = [(language, language)]
    if language == "cpp":
        own.append(("c", "c"))
    own.append(("language_agnostic", "language_agnostic"))
    patterns: list[_Pattern] = []
    for file_stem, config_key in own:
        enabled = set(config.get(config_key, {}).get("regex", {}).get("rules", []) or [])
        for rule in yaml.safe_load((root / "regex" / f"{file_stem}.yaml").read_text()) or []:
            pattern_id = rule.get("pattern_id")
            if pattern_id is not None and pattern_id not in enabled:
                continue
            patterns.append(
                _Pattern(
                    re.compile(rule["rule"]),
                    str(rule["cwe_id"]),
                    pattern_id or rule["rule"],
                    str(rule["severity"]).lower(),
                )
            )
    return patterns


def _semgrep_core() -> Path:
    """The `semgrep-core` binary of the semgrep package, else on PATH."""
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("semgrep")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "semgrep-core"
            if candidate.is_file():
                return candidate
    found = shutil.which("semgrep-core")
    if found is None:
        raise CodeShieldUnavailable("semgrep-core not found: pip install '.[codeshield]'")
    return Path(found)
