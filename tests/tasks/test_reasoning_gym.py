"""reasoning-gym as a task source (``data.reasoning_gym``, ``rlcli.tasks.reasoning_gym:score``): rows generated
deterministically, held-out rows never a training question, the reward exactly the dataset's own ``score_answer``
on the extracted answer, the recipe in ``ppo`` (with its held-out evaluation) and ``env-rollout``, and a clear
refusal without the package."""

from __future__ import annotations

import json

import pytest

from tests.helpers import REPO, invoke_cli, plain, read_metrics, write_yaml
from tests.helpers import save_tokenizer

rg = pytest.importorskip("reasoning_gym", reason="the reasoning extra: pip install 'rlcli[reasoning]'")

from rlcli.config.tasks import ReasoningGymSource  # noqa: E402
from rlcli.tasks import reasoning_gym as task  # noqa: E402

CHAIN = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}
RECIPE = "configs/foreign/reasoning_gym.yaml"
TINY = ["model.name_or_path=null", "model.gguf_file=null", "model.architecture=gpt2", "model.config.n_layer=1",
        "model.config.n_embd=32", "model.config.n_head=2", "model.config.n_positions=256"]


def source(**kw) -> ReasoningGymSource:
    return ReasoningGymSource(**{"dataset": "chain_sum", "config": CHAIN, "size": 200, "eval_size": 50, **kw})


def test_rows_are_the_generators_items_the_same_every_time():
    train, held = task.generate(source(seed=3, eval_seed=999))
    again_train, again_held = task.generate(source(seed=3, eval_seed=999))
    assert train == again_train and held == again_held and len(train) == 200 and len(held) == 50
    # each row is the dataset's own item: question, oracle answer, and the question in the prompt
    ds = rg.create_dataset("chain_sum", seed=999, size=50, **CHAIN)
    for i, row in enumerate(held):
        assert row["question"] == ds[i]["question"] and row["answer"] == ds[i]["answer"]
        assert row["prompt"].startswith(ds[i]["question"].rstrip()) and "<answer>" in row["prompt"]
    assert json.loads(json.dumps(train)) == train  # plain JSON: episodes.jsonl keeps rows


def test_held_out_rows_never_overlap_training_rows_even_with_adjacent_seeds():
    """chain_sum draws item i from Random(seed + i): seeds 5 and 6 give the same items shifted by one, so the raw
    generators overlap almost entirely; the generated training rows share no question with the held-out rows and
    still number ``size``."""
    cfg = source(seed=5, eval_seed=6, size=300, eval_size=100)
    raw_train = {rg.create_dataset("chain_sum", seed=5, size=300, **CHAIN)[i]["question"] for i in range(300)}
    raw_held = {rg.create_dataset("chain_sum", seed=6, size=100, **CHAIN)[i]["question"] for i in range(100)}
    assert len(raw_train & raw_held) >= 90  # the hazard is real
    train, held = task.generate(cfg)
    assert len(train) == 300 and len(held) == 100
    assert not {r["question"] for r in train} & {r["question"] for r in held}
    # the rows skipped are exactly the held-out questions; the rest are the generator's items in order
    ds = rg.create_dataset("chain_sum", seed=5, size=1600, **CHAIN)
    kept = [ds[i]["question"] for i in range(1600) if ds[i]["question"] not in raw_held][:300]
    assert [r["question"] for r in train] == kept


def test_the_reward_is_the_datasets_own_score_answer_on_the_extracted_answer():
    train, _ = task.generate(source(answer="answer_tag", seed=1, eval_size=0, size=40))
    ds = rg.create_dataset("chain_sum", seed=1, size=40, **CHAIN)
    right = [f"Let me add.\n<answer>{r['answer']}</answer>" for r in train]
    wrong = [f"<answer>{int(r['answer']) + 1}</answer>" for r in train]
    partial = [f"<answer>{r['answer']}0</answer>" for r in train]  # the oracle inside a longer answer
    untagged = [r["answer"] for r in train]
    for responses in (right, wrong, partial, untagged):
        expected = [ds.score_answer(task.extract(t, "answer_tag"), ds[i]) for i, t in enumerate(responses)]
        assert task.score(answers=responses, rows=train) == expected
    assert task.score(right, train) == [1.0] * 40 and task.score(wrong, train) == [0.0] * 40
    assert task.score(untagged, train) == [0.0] * 40  # no tags: the dataset scores None


def test_each_extraction_and_the_format_reward():
    assert task.extract("so 3 + 4 = 7, then 1,024 apples", "last_number") == "1024"
    assert task.extract("the answer is -12.", "last_number") == "-12"
    assert task.extract("no digits", "last_number") is None
    assert task.extract(r"thus \boxed{\frac{1}{2}} and \boxed{7}", "boxed") == "7"
    assert task.extract(r"\boxed{\frac{1}{2}} then \boxed{3", "boxed") == r"\frac{1}{2}"
    assert task.extract("<answer>1</answer> then <answer> 5 </answer>", "answer_tag") == "5"
    train, _ = task.generate(source(answer="last_number", format_weight=0.25, eval_size=0, size=10))
    scores = task.score([f"It is {r['answer']}." for r in train] + ["I do not know."] * 10
                        + [f"It is {int(r['answer']) + 1}." for r in train], train + train + train)
    assert scores == [1.25] * 10 + [0.0] * 10 + [0.25] * 10
    assert "number" in train[0]["prompt"].splitlines()[-1]


def test_a_weighted_mix_scores_each_row_with_its_own_dataset():
    mix = ReasoningGymSource(datasets={"chain_sum": {"config": CHAIN, "weight": 3},
                                       "leg_counting": {"config": {"max_animals": 3}, "weight": 1}},
                             size=400, eval_size=40, answer="answer_tag")
    train, held = task.generate(mix)
    names = [r["dataset"] for r in train]
    assert set(names) == {"chain_sum", "leg_counting"} and 0.6 < names.count("chain_sum") / 400 < 0.9
    assert not {r["question"] for r in train} & {r["question"] for r in held}
    assert task.score([f"<answer>{r['answer']}</answer>" for r in train], train) == [1.0] * 400


def test_bad_sources_are_named_before_anything_loads(monkeypatch):
    problems = task.check_source(source(dataset="chain_summ"))
    assert problems and problems[0].key == "data.reasoning_gym.dataset" and "chain_sum" in problems[0].message
    problems = task.check_source(source(config={"max_termz": 2}))
    assert problems and "max_termz" in problems[0].message
    with pytest.raises(ValueError, match="seed"):
        source(config={"seed": 3})


def test_dry_run_without_the_package_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "reasoning_gym"
                        else real(name, *a))
    code, out, err = invoke_cli("ppo", RECIPE, "--dry-run", *TINY, monkeypatch=monkeypatch)
    text = plain(out + err)
    assert code == 2 and "Traceback" not in text
    assert "data.reasoning_gym" in text and "rlcli[reasoning]" in text and "reasoning_gym.yaml" in text


def test_recipe_dry_run(monkeypatch):
    code, stdout, stderr = invoke_cli("ppo", RECIPE, "--dry-run", monkeypatch=monkeypatch)
    assert code == 0, stdout + stderr
    assert "200 rows at seed 1000003" in plain(stdout)


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    return save_tokenizer("chat_eot", tmp_path_factory.mktemp("tok") / "chat_eot")


def test_two_ppo_steps_with_held_out_evaluation_score_with_the_datasets_answers(chat_tokenizer, tmp_path,
                                                                                monkeypatch):
    """The shipped recipe on a tiny model built from scratch: 2 GRPO steps, evaluated before and after on the
    generated held-out rows; every logged sample's reward is the dataset's score of its response."""
    from rlcli.config.loader import load_recipe
    from rlcli.config.ppo import PPORecipe
    from rlcli.trainers import ppo

    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    recipe = load_recipe(PPORecipe, RECIPE, [f"output_dir={out}", *TINY, f"model.tokenizer={chat_tokenizer}",
                                             "data.reasoning_gym.size=16", "data.reasoning_gym.eval_size=8",
                                             "ppo.steps=2", "ppo.batch_size=8", "ppo.mini_batch_size=8",
                                             "ppo.micro_batch_size=8", "ppo.group_size=4",
                                             "generation.max_new_tokens=6", "eval.every=null",
                                             "train.sample_every=1", "train.samples_per_log=8",
                                             "logging.progress=false", "lora=null",
                                             "data.reasoning_gym.format_weight=0.5",
                                             "data.max_prompt_length=200"])
    ppo.train(recipe)
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert "eval/pass@1" in metrics[0] and "eval/pass@1" in metrics[-1] and "reward_mean" in metrics[1]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    train, _ = task.generate(recipe.data.reasoning_gym)
    assert len(samples) == 16
    for s in samples:  # the logged prompt is the chat-templated one
        (row,) = [r for r in train if r["prompt"] in s["prompt"]][:1]
        assert s["reward"] == pytest.approx(task.score_one(s["response"], row))


def test_env_rollout_of_held_out_rows_with_a_tool(chat_tokenizer, tmp_path, monkeypatch):
    """``env-rollout`` on the held-out split with a calculator tool: every episode is a held-out question and its
    reward is the dataset's score of the episode's final answer."""
    out = tmp_path / "rollout"
    recipe = write_yaml(tmp_path / "rollout.yaml", {
        "output_dir": str(out),
        "model": {"architecture": "gpt2", "tokenizer": str(chat_tokenizer),
                  "config": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 256}},
        "data": {"reasoning_gym": {"dataset": "chain_sum", "config": CHAIN, "size": 20, "eval_size": 6,
                                   "answer": "last_number"}, "split": "eval"},
        "env": {"tools": {"calculator": "calculator"}, "tool_isolation": "inline", "protocol": "chat",
                "max_turns": 2, "max_new_tokens": 8, "max_length": 200},
        "reward": {"function": "rlcli.tasks.reasoning_gym:score"},
        "batch_size": 6, "show": 0})
    code, stdout, stderr = invoke_cli("env-rollout", str(recipe), monkeypatch=monkeypatch)
    assert code == 0, stdout + stderr
    episodes = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    _, held = task.generate(ReasoningGymSource(dataset="chain_sum", config=CHAIN, size=20, eval_size=6,
                                               answer="last_number"))
    assert [e["meta"]["question"] for e in episodes] == [r["question"] for r in held]
    for e, row in zip(episodes, held):
        assert e["reward"] == task.score_one(e["answer"], row)
