"""TextArena games as stateful environments (``env.environment: {spec: builtin:textarena, options: {game: ID}}``):
the game's observation opens the episode, each model turn is ``env.step``, the game ends the episode and its reward
is the episode's: the same reward TextArena gives for the same moves played directly. A two-player game against a
fixed-policy opponent; a game that needs downloads fails with one error and nothing is fetched."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import REPO, invoke_cli, plain, read_metrics
from tests.helpers import save_tokenizer

ta = pytest.importorskip("textarena", reason="the textarena extra: pip install 'rlcli[textarena]'")

from rlcli.tasks.textarena import TextArenaGame  # noqa: E402

RECIPE = "configs/foreign/textarena.yaml"
TINY = ["model.name_or_path=null", "model.gguf_file=null", "model.architecture=gpt2", "model.config.n_layer=1",
        "model.config.n_embd=32", "model.config.n_head=2", "model.config.n_positions=1024"]


def target_of(seed: int) -> int:
    env = ta.make("GuessTheNumber-v0")
    env.reset(num_players=1, seed=seed)
    return env.game_number


def played_directly(game: str, seed: int, moves: list[str]) -> tuple[int, float | None]:
    """TextArena on its own: (moves until it said done, its reward for player 0) for the same moves."""
    env = ta.make(game)
    env.reset(num_players=1, seed=seed)
    for n, move in enumerate(moves, 1):
        done, _ = env.step(move)
        if done:
            rewards, _ = env.close()
            return n, rewards[0]
    return len(moves), None


def binary_search(target: int, low: int = 1, high: int = 20) -> list[int]:
    guesses = []
    while True:
        mid = (low + high) // 2
        guesses.append(mid)
        if mid == target:
            return guesses
        low, high = (mid + 1, high) if mid < target else (low, mid - 1)


def run_episodes(game_options: dict, rows: list[dict], plans: dict, max_turns: int):
    """Episodes of a scripted policy (``tests.helpers.ScriptedLM``: turn t of episode k emits ``plans[k][t]``)
    through ``TextEnvironment`` with the tag protocol and the built-in TextArena environment."""
    from rlcli.config.env import EnvConfig, ToolSpec
    from rlcli.env import TextEnvironment
    from rlcli.env.build import build_environments
    from rlcli.env.protocols import TagProtocol
    from rlcli.models.tokenizer import build_byte_tokenizer
    from rlcli.rl.sampling import SamplingRules
    from tests.helpers import ScriptedLM, tiny_gpt2

    tok = build_byte_tokenizer()
    envs = build_environments(EnvConfig(environment=ToolSpec(spec="builtin:textarena", options=game_options)))
    ids = {k: [tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for text in turns]
           for k, turns in plans.items()}
    model = ScriptedLM(tiny_gpt2(tok, n_positions=4096), tok, ids).eval()
    env = TextEnvironment(model, tok, {}, TagProtocol(), max_turns=max_turns, max_new_tokens=12, max_length=4000,
                          environments=envs, rules=SamplingRules(eos_ids=(tok.eos_token_id,)))
    prompts = [f"#{k}: Play." for k in range(len(rows))]
    return env.run(prompts, rows, generator=torch.Generator().manual_seed(0))


def test_the_game_ends_the_episode_and_its_reward_is_the_episodes():
    seeds = [3, 11, 12]
    wins = {k: [f"[{g}]" for g in binary_search(target_of(s))] for k, s in enumerate(seeds[:2])}
    # episode 2 never finds it: ten wrong guesses end the game by its own turn limit (GuessTheNumber-v0: 10)
    t = target_of(seeds[2])
    wrong = [f"[{g}]" for g in range(1, 21) if g != t][:10]
    plans = {**wins, 2: wrong + ["[1]"]}
    histories = run_episodes({"game": "GuessTheNumber-v0"}, [{"seed": s} for s in seeds], plans, max_turns=12)
    for k, (h, seed) in enumerate(zip(histories, seeds)):
        moves = plans[k]
        played, reward = played_directly("GuessTheNumber-v0", seed, moves)
        assert h.finish_reason == "done" and h.num_turns == played  # the game ended it, at its move
        assert h.env_reward == pytest.approx(reward) and h.env_error is None
        tool_text = "".join(s.text for s in h.segments if s.source == "tool")
        assert "Game over" in tool_text
        assert h.segments[0].text.count("Guess The Number") == 1  # the first observation ends the prompt, once
    assert [h.env_reward for h in histories[:2]] == [1.0, 1.0] and histories[2].env_reward < 1.0
    assert "higher" in "".join(s.text for s in histories[0].segments) or len(plans[0]) == 1


def test_an_episode_out_of_turns_scores_unfinished_reward_and_a_refused_move_is_the_games_business():
    seed = 5
    histories = run_episodes({"game": "GuessTheNumber-v0", "unfinished_reward": -0.5}, [{"seed": seed}] * 2,
                             {0: ["[30]", "no move", "[30]"], 1: ["[1]", "[2]", "[3]"]}, max_turns=3)
    # episode 0: two invalid moves (outside the range, then no move) exhaust GuessTheNumber's error allowance: the
    # game ends it with its own penalty; episode 1 runs out of turns with the game still on
    _, reward = played_directly("GuessTheNumber-v0", seed, ["[30]", "no move"])
    assert histories[0].finish_reason == "done" and histories[0].env_reward == reward
    # its last turn is not played (rlcli answers every turn but the last): the game is still on
    assert histories[1].finish_reason == "eos" and histories[1].num_turns == 3 and histories[1].env_reward == -0.5


def test_two_players_against_a_fixed_opponent():
    """TicTacToe-v0: the opponent plays the first free square of its list; the model's scripted moves win on the
    diagonal, so the game ends with the model's win (reward 1) after its 3rd move."""
    options = {"game": "TicTacToe-v0", "num_players": 2, "opponent_moves": [f"[{i}]" for i in (0, 1, 3, 5, 7)]}
    histories = run_episodes(options, [{"seed": 0}], {0: ["[4]", "[8]", "[2]", "[6]"]}, max_turns=6)
    (h,) = histories
    assert h.finish_reason == "done" and h.num_turns == 4 and h.env_reward == 1.0
    text = "".join(s.text for s in h.segments if s.source == "tool")
    assert "[Player 1] [0]" in text and "[Player 1] [1]" in text and "has won" in text
    game = TextArenaGame(**options)
    game.reset(seed=0)
    with pytest.raises(ValueError, match="opponent_moves"):
        TextArenaGame("TicTacToe-v0", num_players=2)


def test_a_game_that_needs_downloads_fails_with_one_error_and_fetches_nothing(monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    code, out, err = invoke_cli("ppo", RECIPE, "--dry-run", *TINY,
                                'env.environment={spec: builtin:textarena, options: {game: Wordle-v0}}',
                                monkeypatch=monkeypatch)
    text = plain(out + err)
    assert code == 2 and "Traceback" not in text
    assert "env.environment" in text and "Wordle-v0" in text and "NLTK data" in text and "words" in text
    code, out, err = invoke_cli("ppo", RECIPE, "--dry-run", *TINY,
                                'env.environment={spec: builtin:textarena, options: {game: GuessNumber-v0}}',
                                monkeypatch=monkeypatch)
    assert code == 2 and "GuessTheNumber-v0" in plain(out + err)


def test_recipe_two_grpo_steps_on_a_tiny_model(tmp_path, monkeypatch):
    """The shipped recipe, a tiny model built from scratch: 2 GRPO steps and the evaluation before and after;
    every episode is a game that ended by the game or by its turns, scored by the game."""
    from rlcli.config.loader import load_recipe
    from rlcli.config.ppo import PPORecipe
    from rlcli.trainers import ppo

    tok = save_tokenizer("chat_eot", tmp_path / "tok")
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    collected, collect = [], ppo.collect_episodes
    monkeypatch.setattr(ppo, "collect_episodes", lambda setup, step: collected.append(collect(setup, step))
                        or collected[-1])
    recipe = load_recipe(PPORecipe, RECIPE, [f"output_dir={out}", *TINY, f"model.tokenizer={tok}", "lora=null",
                                             "ppo.steps=2", "ppo.batch_size=8", "ppo.mini_batch_size=8",
                                             "ppo.micro_batch_size=8", "env.max_turns=3", "generation.max_new_tokens=6",
                                             "eval.max_prompts=4", "logging.progress=false"])
    ppo.train(recipe)
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [0, 1, 2] and "eval/pass@1" in metrics[-1]
    for ep in collected:
        for h, score in zip(ep.histories, ep.scores.tolist()):
            assert h.finish_reason in ("done", "eos", "max_new_tokens", "max_length") and h.env_error is None
            assert score == pytest.approx(h.env_reward)
            assert "Guess The Number" in h.segments[0].text
    assert all(m["env_errors"] == 0 for m in metrics[1:])
    assert json.loads((out / "samples.jsonl").read_text().splitlines()[0])["prompt"]


@pytest.mark.parametrize("game, move", [("TowerOfHanoi-v0", "[A C]"), ("FrozenLake-v0", "[down]"),
                                        ("Mastermind-v0", "[1 2 3 4]"), ("GuessTheNumber-v0-hardcore", "[25]")])
def test_any_single_player_game_id_plays(game, move):
    """Other single-player ids, by name only: the observation the game gives, a move the game takes, and the
    reward TextArena itself gives once the game is over (played to its end with the same move)."""
    episode = TextArenaGame(game)
    first = episode.reset(seed=7)
    assert first and "[GAME]" in first
    answers = []
    for _ in range(60):
        answers.append(episode._respond(move))
        if episode.done:
            break
    assert answers[0] and all(a for a in answers)
    env = ta.make(game)
    env.reset(num_players=1, seed=7)
    for _ in range(len(answers)):
        done, _ = env.step(move)
    assert episode.done == done
    if done:
        rewards, _ = env.close()
        assert episode.get_reward() == rewards[0]
    else:
        assert episode.get_reward() == 0.0


def test_recipe_dry_run(monkeypatch):
    code, stdout, stderr = invoke_cli("ppo", RECIPE, "--dry-run", monkeypatch=monkeypatch)
    assert code == 0, stdout + stderr
    assert "builtin:textarena" in stdout and "dry run OK" in plain(stdout)
