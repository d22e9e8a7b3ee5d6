"""docs/reference.md is generated from the recipe schema (scripts/recipe_reference.py): it must be current, so the
written reference can never disagree with ``rlcli explain`` or with what validation accepts."""

from __future__ import annotations

import importlib.util

from tests.helpers import REPO


def test_the_recipe_reference_is_current():
    spec = importlib.util.spec_from_file_location("recipe_reference", REPO / "scripts" / "recipe_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = (REPO / "docs" / "reference.md").read_text()
    assert written == module.render(), "docs/reference.md is out of date: run python scripts/recipe_reference.py"
    for key in ("`clip_range_high`", "`entropy_coef`", "ppo: `kl`", "env-rollout"):
        assert key in written
