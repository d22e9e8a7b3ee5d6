"""Recipe schemas, YAML loading, overrides, plug-in resolution. Imports nothing else of rlcli."""

from rlcli.config.errors import Problem, RecipeError, UserError
from rlcli.config.loader import load_recipe, recipe_to_yaml
from rlcli.config.plugins import resolve_object

__all__ = ["Problem", "RecipeError", "UserError", "load_recipe", "recipe_to_yaml", "resolve_object"]
