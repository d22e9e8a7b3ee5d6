from __future__ import annotations

import pytest

from rlcli.config import UserError
from rlcli.plugins import resolve_object


def test_file_and_module_specs(tmp_path, monkeypatch):
    (tmp_path / "plug.py").write_text("def score(x):\n    return len(x)\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_object("plug.py:score")("abc") == 3
    assert resolve_object("os.path:join")("a", "b") == "a/b"


@pytest.mark.parametrize(
    "spec, fragment",
    [("nofile.py:f", "does not exist"), ("os.path:nope", "no attribute 'nope'"), ("not_a_module_xyz:f", "cannot import"),
     ("justaname", "expected 'path/to/file.py:name'")],
)
def test_errors_name_the_spec(spec, fragment):
    with pytest.raises(UserError, match=fragment):
        resolve_object(spec)


def test_missing_name_lists_only_the_files_own_callables(tmp_path):
    plugin = tmp_path / "plug.py"
    plugin.write_text("from __future__ import annotations\nimport math\nfrom os.path import join\n\nLIMIT = 3\n\n"
                      "def score(responses):\n    return [1.0] * len(responses)\n")
    with pytest.raises(UserError) as err:
        resolve_object(f"{plugin}:scor")
    assert str(err.value).endswith("(it has: score)")
