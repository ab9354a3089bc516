"""The README's quickstart runs, and its test command is the one CI runs."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
MARKER = "<!-- quickstart: executed by tests/test_readme.py -->"


def _fenced_blocks(text: str, lang: str) -> list[str]:
  return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def _quickstart() -> str:
  assert MARKER in README, f"README.md lost its marker {MARKER!r}"
  blocks = _fenced_blocks(README.split(MARKER, 1)[1], "python")
  assert blocks, "no ```python block after the quickstart marker"
  return blocks[0]


def _number(label: str, out: str) -> float:
  found = re.findall(rf"^{label} (\S+)$", out, flags=re.M)
  assert len(found) == 1, f"the quickstart must print one {label!r} line, printed:\n{out}"
  return float(found[0])


def test_quickstart_runs_and_the_loss_goes_down(capsys):
  code = compile(_quickstart(), "README.md:quickstart", "exec")
  exec(code, {"__name__": "__quickstart__"})  # pylint: disable=exec-used
  out = capsys.readouterr().out
  initial, final = _number("initial loss", out), _number("final loss", out)
  assert final < 0.5 * initial, out
  assert out.rstrip().splitlines()[-1] == "float32", out  # master_params: hi + lo in float32


def test_readme_test_command_is_what_ci_runs():
  bash = _fenced_blocks(README, "bash")
  assert len(bash) >= 2, "README.md needs the main command and the test command as ```bash blocks"
  command = bash[1].strip()
  assert "pytest" in command and "python3 -m venv .venv" in command, command
  ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
  assert command in ci.splitlines(), f".ci/run must run the README's test command verbatim:\n{command}"
