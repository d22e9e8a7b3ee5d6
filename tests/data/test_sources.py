"""Reading local data: a directory is read whole (or refused, saying why), and a bad row is named by file:line."""

from __future__ import annotations

import json

import pytest

from rlcli.config.errors import UserError
from rlcli.data.sources import load_rows, row_ref
from tests.helpers import REPO, plain, run_cli


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _mixed_dir(tmp_path):
    """A data directory as users have them: 20 JSON-lines rows and two 1-row CSV files of the same columns."""
    d = tmp_path / "mixed"
    d.mkdir()
    _jsonl(d / "a.jsonl", [{"prompt": f"p{i} ", "completion": f"c{i}"} for i in range(20)])
    (d / "b.csv").write_text("prompt,completion\nhi ,there\n")
    (d / "c.csv").write_text("prompt,completion\nyo ,x\n")
    return d


def test_a_directory_of_mixed_files_is_read_whole(tmp_path, capsys):
    d = _mixed_dir(tmp_path)
    rows = load_rows(str(d))
    assert len(rows) == 22 and rows[20] == {"prompt": "hi ", "completion": "there"}
    out = plain(capsys.readouterr().out)
    assert "read 22 rows from 3 file(s): a.jsonl (20), b.csv (1), c.csv (1)" in out, out
    assert row_ref(str(d), 3) == f"{d / 'a.jsonl'}:4" and row_ref(str(d), 21) == f"{d / 'c.csv'} row 1"
    assert len(load_rows(str(d), "train[:21]")) == 21


def test_a_directory_whose_files_disagree_is_refused(tmp_path):
    d = _mixed_dir(tmp_path)
    (d / "d.csv").write_text("text\nhello\n")
    with pytest.raises(UserError, match=r"do not have the same columns.*d.csv: text"):
        load_rows(str(d))
    (d / "d.csv").unlink()
    _jsonl(d / "e.jsonl", [{"prompt": 1, "completion": 2}])
    with pytest.raises(UserError, match=r"column 'prompt' holds .*string.* in a.jsonl but .*int.* in e.jsonl"):
        load_rows(str(d))


def test_split_files_in_a_directory(tmp_path):
    _jsonl(tmp_path / "train.jsonl", [{"text": "a"}, {"text": "b"}])
    _jsonl(tmp_path / "test.jsonl", [{"text": "c"}])
    assert load_rows(str(tmp_path))["text"] == ["a", "b"]
    assert load_rows(str(tmp_path), "test")["text"] == ["c"]
    with pytest.raises(UserError, match="no split 'validation'; its file names make the split"):
        load_rows(str(tmp_path), "validation")


@pytest.mark.parametrize("text, where, what", [
    ('{"text": "a"}\n\n{"text": "b",}\n', ":3", "not valid JSON"),
    ('{"text": "a"}\n["not", "an", "object"]\n', ":2", "expected a JSON object"),
])
def test_a_malformed_json_line_is_named_by_file_and_line(tmp_path, text, where, what):
    path = tmp_path / "rows.jsonl"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_rows(str(path))
    assert f"{path}{where}: {what}" in str(err.value)


def test_cli_trains_on_every_file_of_a_mixed_directory(tmp_path):
    d = _mixed_dir(tmp_path)
    res = run_cli("sft", "configs/tiny/sft.yaml", f"output_dir={tmp_path / 'out'}", f"data.path={d}",
                  "data.eval_fraction=0", "train.max_steps=1", "train.batch_size=2", "train.micro_batch_size=2",
                  "logging.progress=false")
    assert res.returncode == 0, res.stderr[-2000:]
    out = plain(res.stdout)
    assert "read 22 rows from 3 file(s)" in out and "22 train examples" in out, out
    assert REPO.exists()
