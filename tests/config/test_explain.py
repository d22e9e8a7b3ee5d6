"""``rlcli explain``: the schema's field docstrings, from the command line."""

from __future__ import annotations

from tests.helpers import plain, run_cli


def test_explain_a_key_a_section_and_a_typo():
    res = run_cli("explain", "ppo.kl.coef")
    text = plain(res.stdout)
    assert res.returncode == 0
    assert "type: float" in text and "default: 0.05" in text and ">= 0" in text and "β" in text
    res = run_cli("explain", "ppo", "generation")  # the two-argument form
    text = plain(res.stdout)
    assert res.returncode == 0 and "min_new_tokens: int = 0" in text and "behaviour policy" in text
    res = run_cli("explain", "sft.optim.lr")
    assert res.returncode == 2 and "did you mean 'learning_rate'" in plain(res.stderr)
    res = run_cli("explain", "ppo.advantage")  # named without its section (ppo.ppo.advantage): the only one
    assert res.returncode == 0 and plain(res.stdout).startswith("ppo ppo.advantage") and "'rloo'" in res.stdout
    res = run_cli("explain", "ppo.advantag")  # a typo of a key in a section is suggested with its section
    assert res.returncode == 2 and "did you mean 'ppo.advantage'" in plain(res.stderr)
    res = run_cli("explain", "train.x")
    assert res.returncode == 2 and "unknown command 'train'" in plain(res.stderr)


def test_every_key_of_every_recipe_is_documented():
    """A key without a docstring is a key `rlcli explain` cannot explain."""
    from rlcli.config.explain import COMMANDS, _doc, _model_class, schema_for

    undocumented = []

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            section = _model_class(field.annotation)
            if not _doc(field, section):
                undocumented.append(prefix + name)
            if section is not None:
                walk(section, f"{prefix}{name}.")

    for command in COMMANDS:
        walk(schema_for(command), f"{command}: ")
    assert not undocumented, undocumented
