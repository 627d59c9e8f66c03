"""Assemble a self-contained Hugging Face Space folder: the app of spaces/hf-bomerge plus the hf_bomerge package.

hf-bomerge is not on PyPI, so the Space carries the package itself:

python spaces/build_space.py build/hf-bomerge-space hf repos create ME/hf-bomerge --repo-type space --space-sdk gradio
--exist-ok hf upload ME/hf-bomerge build/hf-bomerge-space . --repo-type space

The folder holds app.py, handlers.py, space_limits.py, space_worker.py, README.md (the Space's front matter),
requirements.txt, screenshot.png and hf_bomerge/ with the card templates in hf_bomerge/model_cards/ (a package with an
__init__.py, since `hf_bomerge.publish.card` loads its template through
`importlib.resources.files("hf_bomerge.model_cards")`). The build checks that requirements.txt names every dependency
of pyproject.toml, then imports `hf_bomerge.publish.card` and reads the template from the assembled folder, in a fresh
interpreter, and fails if anything resolves outside it."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "spaces" / "hf-bomerge"
SPACE_FILES = ["app.py", "handlers.py", "space_limits.py", "space_worker.py", "README.md", "requirements.txt",
               "screenshot.png"]
CHECK = """
import sys
from importlib import resources
from pathlib import Path
import hf_bomerge, hf_bomerge.publish.card, space_worker, handlers, space_limits
root = Path(sys.argv[1]).resolve()
for module in (hf_bomerge, hf_bomerge.publish.card, space_worker, handlers, space_limits):
    assert Path(module.__file__).resolve().is_relative_to(root), f"{module.__name__} from {module.__file__}"
template = resources.files("hf_bomerge.model_cards").joinpath("bomerge.md")
assert Path(str(template)).resolve().is_relative_to(root), f"template from {template}"
assert "{{ card_data }}" in template.read_text()
"""


class BuildError(Exception):
    """The Space folder cannot be assembled (the message says why)."""


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[@]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def check_requirements(requirements: Path = SPACE / "requirements.txt", pyproject: Path = ROOT / "pyproject.toml"
                       ) -> None:
    """Every runtime dependency of the package must be installed in the Space."""
    if tomllib is None:
        raise BuildError("Reading pyproject.toml needs Python 3.11 or newer (tomllib); run this script with it.")
    wanted = {_name(d) for d in tomllib.loads(pyproject.read_text())["project"]["dependencies"]}
    lines = [line.split("#", 1)[0].strip() for line in requirements.read_text().splitlines()]
    have = {_name(line) for line in lines if line and not line.startswith("-")}
    missing = sorted(wanted - have)
    if missing:
        raise BuildError(f"{requirements} lacks {', '.join(missing)}, which pyproject.toml's dependencies need; "
                         "add them so that the Space installs what hf_bomerge imports.")


def build(out: str | Path, *, overwrite: bool = False, verify: bool = True) -> Path:
    """Write the Space folder to `out` (replaced only with `overwrite`); returns its path."""
    out = Path(out).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BuildError(f"{out} exists and is not empty; choose another folder or pass --overwrite.")
    check_requirements()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        for name in SPACE_FILES:
            shutil.copy2(SPACE / name, staging / name)
        shutil.copytree(ROOT / "hf_bomerge", staging / "hf_bomerge",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        cards = staging / "hf_bomerge" / "model_cards"
        cards.mkdir()
        (cards / "__init__.py").write_text('"""Card templates, copied from model_cards/ by spaces/build_space.py."""\n')
        templates = sorted((ROOT / "model_cards").glob("*.md"))
        if not templates:
            raise BuildError(f"No card templates in {ROOT / 'model_cards'}.")
        for template in templates:
            shutil.copy2(template, cards / template.name)
        if verify:
            _verify(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _verify(folder: Path) -> None:
    """Import hf_bomerge.publish.card and load the card template from `folder`, in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", CHECK, str(folder)], cwd=folder, env=env, capture_output=True,
                          text=True)
    if done.returncode:
        raise BuildError(f"The assembled Space does not import its own hf_bomerge and card template:\n"
                         f"{done.stderr.strip()[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="the folder to write (upload it as the Space)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    args = parser.parse_args(argv)
    try:
        out = build(args.output, overwrite=args.overwrite)
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Space folder written to {out}; deploy it with:\n"
          f"  hf repos create ME/hf-bomerge --repo-type space --space-sdk gradio --exist-ok\n"
          f"  hf upload ME/hf-bomerge {out} . --repo-type space")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
