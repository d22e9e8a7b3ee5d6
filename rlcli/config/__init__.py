"""Recipe schemas, YAML loading, overrides. Imports nothing else of rlcli (plug-ins: ``rlcli.plugins``)."""

from rlcli.config.errors import Problem, RecipeError, UserError
from rlcli.config.loader import load_recipe, recipe_to_yaml

__all__ = ["Problem", "RecipeError", "UserError", "load_recipe", "recipe_to_yaml"]
