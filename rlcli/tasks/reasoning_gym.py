"""reasoning-gym as a task source: prompts and held-out prompts generated from a recipe's ``data.reasoning_gym``, and
the reward ``score`` (``reward.function: rlcli.tasks.reasoning_gym:score``): the dataset's own ``score_answer`` on
the answer extracted from the response, plus an optional format reward.

Rows are generated, not stored: each carries ``reasoning_gym: {spec, split, index, answer, format_weight}``, from
which ``score`` rebuilds the dataset (cached) and the entry it scores against (``dataset[index]``), so a row stays
plain JSON whatever the dataset's metadata holds, and the same row scores the same in ``ppo``, its evaluation and
``env-rollout``.

Held-out rows never overlap training rows: the training rows are the first ``size`` items at ``seed`` whose question
is not one of the ``eval_size`` held-out questions at ``eval_seed`` (reasoning-gym's datasets mostly draw item i
from ``Random(seed + i)``, so nearby seeds share items).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from typing import Any

# rlcli's own modules are imported where they are used: this file also loads as a plain module, with only the
# standard library and reasoning-gym (bench/_trl_driver.py scores TRL's episodes with it)

EXTRA = "pip install 'rlcli[reasoning]'  (reasoning-gym==0.1.25)"
PACKAGE = "reasoning_gym"
INSTRUCTIONS = {
    "answer_tag": "Give your final answer between <answer> and </answer> tags.",
    "last_number": "End your response with the final answer as a number.",
    "boxed": "Put your final answer within \\boxed{}.",
    "full": "",
}
ROW_KEY = "reasoning_gym"


def missing_package() -> str | None:
    """Why reasoning-gym cannot be used here, or None."""
    if importlib.util.find_spec(PACKAGE) is None:
        return f"needs the reasoning-gym package, which is not installed: {EXTRA}"
    return None


# --- generating rows ---------------------------------------------------------------------------------------------


def dataset_spec(source) -> dict[str, Any]:
    """What identifies the generator, without seed and size: ``{"dataset": name, "config": {...}}`` or
    ``{"datasets": {name: {"config": ..., "weight": ...}}}`` (a composite)."""
    if source.dataset is not None:
        return {"dataset": source.dataset, "config": dict(source.config)}
    return {"datasets": {n: {"config": dict(d.config), "weight": d.weight} for n, d in source.datasets.items()}}


@functools.lru_cache(maxsize=64)
def _dataset(spec_json: str, seed: int, size: int):
    import reasoning_gym

    spec = json.loads(spec_json)
    if "dataset" in spec:
        return reasoning_gym.create_dataset(spec["dataset"], seed=seed, size=size, **spec["config"])
    from reasoning_gym.composite import DatasetSpec

    specs = [DatasetSpec(name=n, weight=d["weight"], config=dict(d["config"])) for n, d in spec["datasets"].items()]
    return reasoning_gym.create_dataset("composite", seed=seed, size=size, datasets=specs)


def build_dataset(spec: dict, seed: int, size: int):
    """The reasoning-gym dataset of ``spec`` at ``seed`` / ``size`` (cached: scoring rebuilds it often)."""
    return _dataset(json.dumps(spec, sort_keys=True), seed, size)


def check_source(source, key: str = "data.reasoning_gym") -> list:
    """Problems findable without weights: the package is missing, a dataset name is unknown, a config key is
    wrong, or the held-out rows leave too few training rows."""
    from rlcli.config.errors import Problem, UserError

    why = missing_package()
    if why is not None:
        return [Problem(key, f"data.reasoning_gym {why}")]
    import reasoning_gym  # noqa: F401  (registers the datasets)
    from reasoning_gym.factory import DATASETS

    names = [source.dataset] if source.dataset is not None else list(source.datasets)
    problems = []
    for name in names:
        if name not in DATASETS:
            close = [n for n in DATASETS if n.startswith(name[:3])][:8]
            problems.append(Problem(f"{key}.{'dataset' if source.dataset else 'datasets.' + name}",
                                    f"{name!r} is not a reasoning-gym dataset" +
                                    (f" (similar: {', '.join(close)})" if close else "") +
                                    f"; there are {len(DATASETS)}, e.g. chain_sum, basic_arithmetic, leg_counting"))
    if problems:
        return problems
    try:
        generate(source)
    except UserError as exc:
        problems.append(Problem(key, str(exc)))
    return problems


def _item(dataset, index: int, where: str) -> dict:
    from rlcli.config.errors import UserError

    try:
        return dataset[index]
    except Exception as exc:  # noqa: BLE001 - the generator's own failure, named
        raise UserError(f"reasoning-gym could not generate item {index} ({where}): {type(exc).__name__}: {exc}") \
            from None


def generate(source) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows) of a ``data.reasoning_gym`` section; ``UserError`` when the dataset or its
    config is refused. Each row: ``prompt`` (question and instruction), ``question``, ``answer`` (the oracle's),
    ``dataset`` (the item's own dataset in a mix) and ``reasoning_gym`` (what ``score`` needs)."""
    from rlcli.config.errors import UserError

    spec = dataset_spec(source)
    where = f"dataset {spec.get('dataset') or ', '.join(spec['datasets'])}"
    try:
        held = build_dataset(spec, source.eval_seed, max(source.eval_size, 1))
        train = build_dataset(spec, source.seed, _train_items(source))
    except UserError:
        raise
    except (TypeError, ValueError, AssertionError, KeyError) as exc:
        raise UserError(f"reasoning-gym refused {where} with config {_config_text(spec)}: "
                        f"{type(exc).__name__}: {exc}") from None
    held_rows = [_row(_item(held, i, where), source, "eval", i) for i in range(source.eval_size)]
    held_questions = {r["question"] for r in held_rows}
    rows = []
    for i in range(_train_items(source)):
        item = _item(train, i, where)
        if item["question"] in held_questions:
            continue
        rows.append(_row(item, source, "train", i))
        if len(rows) == source.size:
            return rows, held_rows
    raise UserError(f"data.reasoning_gym: only {len(rows)} of the first {_train_items(source)} items of {where} at "
                    f"seed {source.seed} are not held-out questions, fewer than size={source.size}: its config "
                    "allows too few distinct questions for that many held-out ones; lower eval_size or widen the "
                    "config")


def _train_items(source) -> int:
    """How many items the training rows may be drawn from: a held-out question can come up more than once among
    them when the config allows few distinct questions, so there is room to skip each several times."""
    return 4 * (source.size + source.eval_size)


def _config_text(spec: dict) -> str:
    return json.dumps(spec.get("config", spec.get("datasets")))


def _row(item: dict, source, split: str, index: int) -> dict:
    instruction = INSTRUCTIONS[source.answer] if source.instruction is None else source.instruction
    question = item["question"]
    prompt = f"{question.rstrip()}\n{instruction}" if instruction else question
    seed, size = (source.seed, _train_items(source)) if split == "train" else \
        (source.eval_seed, max(source.eval_size, 1))
    return {"prompt": prompt, "question": question, "answer": str(item["answer"]),
            "dataset": item.get("metadata", {}).get("source_dataset", source.dataset),
            ROW_KEY: {"spec": dataset_spec(source), "seed": seed, "size": size, "index": index,
                      "answer": source.answer, "format_weight": source.format_weight}}


def load_rows(data) -> tuple[list[dict], str]:
    """The rows of a data section with ``reasoning_gym`` (``data.split``: ``train`` or ``eval``), first
    ``max_rows``, and the prompt column."""
    from rlcli.config.errors import UserError

    train, held = generate(data.reasoning_gym)
    rows = held if data.split == "eval" else train
    if not rows:
        raise UserError("data.reasoning_gym: split 'eval' has no rows (set data.reasoning_gym.eval_size)")
    return rows[: data.max_rows] if data.max_rows else rows, "prompt"


# --- reading the answer ------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract(text: str, how: str) -> str | None:
    """The answer in ``text`` as ``how`` reads it (``ReasoningGymSource.answer``), or None when there is none."""
    if how == "answer_tag":
        from reasoning_gym.utils import extract_answer

        return extract_answer(text)
    if how == "last_number":
        found = _NUMBER.findall(text)
        if not found:
            return None
        number = found[-1].replace(",", "")
        return number[:-1] if number.endswith(".") else number
    if how == "boxed":
        return last_boxed(text)
    if how == "full":
        return text.strip() or None
    raise ValueError(f"unknown answer extraction {how!r}")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}``, braces matched (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``)."""
    start = text.rfind("\\boxed{")
    while start != -1:
        depth, i = 0, start + len("\\boxed{") - 1
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i + 1 : j].strip()
        start = text.rfind("\\boxed{", 0, start)  # unclosed: an earlier one may be whole
    return None


# --- the reward --------------------------------------------------------------------------------------------------


def entry_of(row: dict) -> tuple[Any, dict]:
    """The dataset and the entry ``{question, answer, metadata}`` a generated row was made from."""
    meta = row.get(ROW_KEY)
    if not isinstance(meta, dict):
        from rlcli.config.errors import UserError

        raise UserError("rlcli.tasks.reasoning_gym:score scores rows generated by data.reasoning_gym; this row has "
                        f"no {ROW_KEY!r} column (keys: {', '.join(map(str, row))})")
    dataset = build_dataset(meta["spec"], meta["seed"], meta["size"])
    return dataset, dataset[meta["index"]]


def score_one(response: str, row: dict) -> float:
    """The dataset's ``score_answer`` on the extracted answer, plus ``format_weight`` when one was found."""
    dataset, entry = entry_of(row)
    meta = row[ROW_KEY]
    answer = extract(response, meta["answer"])
    value = float(dataset.score_answer(answer, entry))
    return value + (meta["format_weight"] if answer is not None else 0.0)


def score(answers: list[str], rows: list[dict]) -> list[float]:
    """Reward function (``reward.function: rlcli.tasks.reasoning_gym:score``): per episode, the dataset's own
    ``score_answer`` (1.0 for a right answer; some datasets give partial credit) of the answer extracted as
    ``data.reasoning_gym.answer`` says, plus ``data.reasoning_gym.format_weight`` when an answer was found. In a text
    environment ``answers`` are the episodes' final turns; otherwise the responses."""
    return [score_one(text, row) for text, row in zip(answers, rows)]
