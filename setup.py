"""One build step besides pyproject.toml: the wheel's model card template is made from the repository's.

The gauge card template has one home, ``model_cards/gauge_card_template.md`` at the repository root (the
project's design names that folder). A wheel carries it as package data
(``hf_bdgauge/model_cards/gauge_card_template.md``): :class:`BuildPy` copies it into the build tree, so the
package holds no second copy in git that a test must keep equal. A checkout or an editable install has no
built copy and reads the repository's file (:func:`hf_bdgauge.card.gauge_card_template`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
#: the one template, and where the wheel carries it (relative to the built package root)
CARD_TEMPLATE = ROOT / "model_cards" / "gauge_card_template.md"
PACKAGED_CARD_TEMPLATE = Path("hf_bdgauge") / "model_cards" / "gauge_card_template.md"


def copy_card_template(build_lib: str | Path) -> Path:
    """Copy the template into the built package under ``build_lib``; returns the copy."""
    dst = Path(build_lib) / PACKAGED_CARD_TEMPLATE
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(CARD_TEMPLATE, dst)
    return dst


class BuildPy(build_py):
    """``build_py`` that also puts the model card template into the built package."""

    def run(self) -> None:
        super().run()
        if not self.dry_run:
            copy_card_template(self.build_lib)


if __name__ == "__main__":
    setup(cmdclass={"build_py": BuildPy})
