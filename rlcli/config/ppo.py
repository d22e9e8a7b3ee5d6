"""The ``rlcli ppo`` recipe."""

from __future__ import annotations

from typing import Literal

from pydantic import ValidationInfo, Field, field_validator, model_validator

from rlcli.config.env import EnvConfig
from rlcli.config.errors import Problem, RecipeProblems
from rlcli.config.reward import RewardConfig
from rlcli.config.tasks import ReasoningGymSource
from rlcli.config.common import (
    DataSource,
    LoraConfig,
    FrozenModelConfig,
    ModelConfig,
    TrainedModelConfig,
    OptimConfig,
    TrainerRecipe,
    RunSettings,
    Section,
    processes_of,
    share_micro_batch,
)


class PromptData(DataSource):
    """Prompts (queries) to generate from, one per row; the whole row is passed to a function reward."""

    path: str | None = None
    """Local file/dir, or hub dataset id (or, instead, ``reasoning_gym``)."""
    reasoning_gym: ReasoningGymSource | None = None
    """Generate the prompts and held-out prompts with reasoning-gym instead of reading ``path``
    (docs/environments.md, "Tasks from reasoning-gym")."""
    prompt_field: str | None = None
    """Column with the prompt text. Default: ``prompt``, else ``query``, else ``text``."""
    prompt_length: tuple[int, int] | None = None
    """Sample each prompt's length uniformly in [min, max] tokens and keep that many leading tokens (IMDB-style
    review prefixes). Null: use the whole prompt."""
    max_prompt_length: int = Field(256, gt=0)
    """Prompts longer than this keep their last tokens (what the model continues from). A model with learned
    positions (GPT-2) takes at most its positions less ``generation.max_new_tokens``: the smaller of the two counts
    (``--dry-run`` says which)."""
    long_prompts: Literal["truncate", "refuse"] = "truncate"
    """Prompts longer than fits (see ``max_prompt_length``): ``truncate`` keeps their last tokens and the run's
    header says how many were cut; ``refuse`` stops before training, naming the first such row."""
    chat_template: bool = False
    """Wrap each prompt as a user message with the tokenizer's chat template (and the assistant prefix)."""

    @field_validator("prompt_length")
    @classmethod
    def _ordered(cls, v):
        if v is not None and not (0 < v[0] <= v[1]):
            raise ValueError(f"prompt_length must be [min, max] with 0 < min <= max, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "PromptData":
        from rlcli.config.tasks import task_source_problems

        problems = task_source_problems(self, "data")
        if problems:
            raise RecipeProblems(problems)
        return self


class VLLMConfig(Section):
    """vLLM, when ``generation.engine: vllm``: colocated in the training process, weights copied in once per PPO
    step (LoRA merged for the copy)."""

    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    """Share of the GPU's memory vLLM may take (weights, KV cache); the rest is the trainer's."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Precision vLLM runs the policy in (auto: the checkpoint's)."""
    max_model_len: int | None = Field(None, gt=0)
    """Longest prompt + response vLLM plans its KV cache for (null: the model's)."""
    enforce_eager: bool = True
    """No CUDA graphs: faster to start, and weights can be replaced without recapturing them."""
    sleep_between_steps: bool = False
    """Free vLLM's memory while the optimizer runs (``LLM.sleep``), wake it for the next rollouts."""


class GenerationConfig(Section):
    """Sampling for rollouts: the behaviour policy. Every rule here is applied identically by the sampler and by the
    loss, the entropy and the KL, for the policy and the reference (docs/ppo-details.md, item 4)."""

    max_new_tokens: int | None = Field(None, gt=0)
    """Token budget of a response; in a text environment, of one model turn. Default: 32, or 64 per turn with
    ``env``."""
    min_new_tokens: int = Field(0, ge=0)
    """EOS cannot be sampled until a response (in a text environment: each model turn) has this many tokens; the
    loss, entropy and KL use the same EOS-less distribution at those positions."""
    temperature: float = Field(1.0, gt=0)
    """Logits are divided by it for sampling and for every log-prob the loss and the KL use."""
    stop_strings: list[str] = Field(default_factory=list)
    """A response ends at the first of these (kept in the text)."""
    stop_at_eos: bool = True
    """End a response at EOS (the EOS token is kept: the model learns to stop). False: EOS is never sampled, so
    every response runs to ``max_new_tokens`` (or a stop string); the loss uses the same EOS-less distribution."""
    engine: Literal["local", "vllm"] = "local"
    """What samples the rollouts: ``local`` (rlcli's own KV-cache sampler, the reference) or ``vllm`` (a serving
    engine in the training process; ``pip install vllm``). Either way the loss recomputes the log-probs itself; the
    difference to the engine's is logged (``sampler_logprob_diff``, ``sampler_kl``)."""
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)
    """Settings of the vLLM engine."""
    importance_sampling: Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] | None \
        = None
    """Correct for a sampler whose distribution is not the learner's: each token's policy loss is weighted by
    π_old / q (q: the engine's own log-prob of the token), per token or per sequence, with weights above
    ``importance_sampling_cap`` truncated to it or masked to 0 (TRL's ``vllm_importance_sampling_mode``; truncated
    importance sampling, Yao et al. 2025). Logged as ``is_weight_mean`` / ``is_capped_fraction``. Default:
    ``token_truncate`` with ``engine: vllm``, ``none`` with ``local`` (its log-probs are the learner's)."""
    importance_sampling_cap: float = Field(2.0, gt=1)
    """The bound of ``importance_sampling`` (verl's default threshold, Yao et al.'s C = 2)."""


class KLConfig(Section):
    """The KL penalty against the reference model: as a per-token reward -β·KL_t (PPO, ppo-details item 6), or as
    a term β·KL of the loss (GRPO)."""

    coef: float = Field(0.05, ge=0)
    """β, or its starting value when adaptive. (GRPO's paper used 0.04; RLOO's and REINFORCE++'s 0.01-0.05.)"""
    adaptive: bool = False
    """Adapt β towards ``target`` (Ziegler et al.)."""
    target: float = Field(6.0, gt=0)
    """Target KL per sequence (summed over tokens) for adaptive β."""
    horizon: int = Field(10000, gt=0)
    """Adaptive β horizon, in episodes."""
    mode: Literal["reward", "loss"] | None = None
    """``reward``: -β·KL_t is part of every model token's reward (Ziegler et al. 2019; PPO, RLOO, REINFORCE++);
    ``loss``: β × the KL estimate is added to the loss, its gradient taken through the policy's log-probs (GRPO:
    Shao et al. 2024). Default: ``loss`` for ``ppo.advantage: grpo``, else ``reward``."""
    estimator: Literal["k1", "abs", "k2", "mse", "k3", "full"] | None = None
    """Per-token KL estimator, with d = log π − log π_ref: k1 = d; abs = |d|; k2 (= mse) = d²/2; k3 = (r − 1) − log r
    with r = π_ref/π (unbiased, never negative); full = exact KL(π‖π_ref) over the vocabulary (reward mode only).
    In loss mode only the gradient matters, taken on tokens sampled from π with the prefix held fixed: k2's is the
    gradient of KL(π‖π_ref), k3's (GRPO's choice) that of KL(π_ref‖π); k1's is 0 in expectation and abs's no KL's,
    so both are refused there. In reward mode only k1 gives an unbiased gradient of the sequence's KL (docs/
    ppo-details.md, item 6). Default: k3 in loss mode, else k1."""


def estimator_settings(ppo: "PPOAlgo", kl: KLConfig) -> tuple[str, str, str, str]:
    """(advantage_scaling, loss_aggregation, kl.mode, kl.estimator): the recipe's, or where it leaves one unset
    (None), the default of ``ppo.advantage``'s paper (``rlcli.rl.estimators.ESTIMATORS``). Changes nothing."""
    from rlcli.rl.estimators import ESTIMATORS  # the registry lives with the maths (torch: loaded at this check only)

    e = ESTIMATORS[ppo.advantage]
    mode = kl.mode or e.kl_mode
    return (ppo.advantage_scaling or e.scaling, ppo.loss_aggregation or e.aggregation, mode,
            kl.estimator or ("k3" if mode == "loss" else "k1"))


class PPOAlgo(Section):
    """The PPO optimisation, and the advantage estimator (a critic with GAE, or a critic-free group estimator)."""

    advantage: Literal["gae", "grpo", "rloo", "reinforce_pp"] = "gae"
    """How advantages are estimated. ``gae``: a value head (the critic) and GAE (PPO). Critic-free, no value head
    in memory or checkpoints: ``grpo`` (score minus its group's mean, scaled by the group's std; Shao et al. 2024),
    ``rloo`` (score minus the mean of the *other* completions of its prompt; Ahmadian et al. 2024), ``reinforce_pp``
    (REINFORCE++, Hu 2025: return-to-go of the per-token rewards, normalised over the batch; with
    ``group_size`` > 1 the group's mean score is subtracted first, "REINFORCE++-baseline")."""
    group_size: int = Field(1, gt=0)
    """Completions sampled per prompt; ``batch_size`` counts completions and must be a multiple of it (on each
    process: the completions of a prompt are generated and judged on one process). grpo and rloo need >= 2."""
    advantage_scaling: Literal["group", "batch", "none"] | None = None
    """Normalise the advantages over the whole batch (``batch``: subtract the mean, divide by the std, over the
    model tokens of all processes: PPO's whitening, ppo-details item 9, and REINFORCE++; the std counts as at least
    0.01, so near-constant advantages are not scaled up without bound), or divide critic-free advantages by the std
    of their group's scores (``group``: GRPO), or neither (``none``: RLOO, and Dr. GRPO, Liu et al. 2025, who show
    the group std favours too easy and too hard prompts). Default: the estimator's paper (``batch`` for ``gae``)."""
    loss_aggregation: Literal["token_mean", "sequence_mean", "constant"] | None = None
    """How per-token losses of a minibatch become one number: ``token_mean`` (every token weighs the same; DAPO, Yu
    et al. 2025; PPO), ``sequence_mean`` (each sequence's token mean, then the mean over sequences; GRPO),
    ``constant`` (the token sum over sequences × the generation budget; Dr. GRPO, which removes the length bias of
    ``sequence_mean``). Default: the estimator's paper."""

    steps: int = Field(100, gt=0)
    """PPO steps (each: one batch of rollouts, then ``epochs`` passes of minibatch updates)."""
    batch_size: int = Field(64, gt=0)
    """Episodes per PPO step, over all processes."""
    mini_batch_size: int = Field(16, gt=0)
    """Episodes per optimizer step, over all processes."""
    micro_batch_size: int | None = Field(None, gt=0)
    """Episodes per forward pass on one process (gradient accumulation fills a minibatch). Default: the whole
    per-process share of a minibatch, mini_batch_size / processes, in one pass; set it lower when memory is short."""
    epochs: int = Field(4, gt=0)
    """Passes over each batch; minibatches are reshuffled every epoch."""
    gamma: float = Field(1.0, ge=0, le=1)
    """GAE's discount per model token (gae only)."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE's λ: 1 = Monte-Carlo returns, 0 = one-step TD (gae only)."""
    clip_range: float = Field(0.2, gt=0, lt=1)
    """ε of the clipped policy loss: the ratio π/π_old counts only within [1 - ε, 1 + ε] (Schulman et al. 2017)."""
    clip_range_high: float | None = Field(None, gt=0)
    """Upper ε of the ratio's clip, [1 - clip_range, 1 + clip_range_high]: a larger one lets unlikely tokens with a
    positive advantage grow faster and keeps the entropy from collapsing ("clip-higher", DAPO: Yu et al. 2025, who
    use 0.28 with clip_range 0.2). Null: clip_range (symmetric)."""
    dual_clip: float | None = Field(None, gt=1)
    """Dual-clip PPO (Ye et al. 2020; verl's clip_ratio_c, 3.0): a token with a negative advantage loses at most
    c × |A|, however far its ratio has grown above 1. Null: off."""
    entropy_coef: float = Field(0.0, ge=0)
    """Entropy bonus: the loss subtracts this × the entropy of the sampling distribution (the same rules as the
    log-probs), aggregated like the policy loss. 0 (the default, as TRL and most LM recipes): no bonus, and no extra
    computation."""
    clip_range_value: float = Field(0.2, gt=0)
    """How far a value prediction may move from its rollout value before the value loss is clipped (gae only)."""
    vf_coef: float = Field(0.1, ge=0)
    """Weight of the value loss beside the policy loss (gae only; the value head shares the policy's trunk)."""
    whiten_rewards: bool = False
    """Whiten per-token rewards per batch, without re-centring (the same floor)."""
    score_norm: Literal["none", "running"] = "none"
    """``running``: normalise scores by running mean/std (kept in checkpoints) before the KL penalty."""
    score_clip: float | None = Field(None, gt=0)
    """Clip scores to ±this (after ``reward.weight`` and ``score_norm``)."""
    target_approx_kl: float | None = Field(None, gt=0)
    """The KL guard: each minibatch's approx-KL to the rollout policy (mean ½(log π − log π_old)² over its tokens,
    over all processes) is checked before its optimizer step; above 1.5 × this, the minibatch is not applied and the
    step's remaining minibatches and epochs are dropped (``early_stopped``). Also logs ``approx_kl_after``, the same
    measure after the update (one more forward pass of the policy). Null: no guard."""
    value_head_init_std: float = Field(0.0, ge=0)
    """Value head weights ~ N(0, std); 0 = zero init (ppo-details item 8)."""


class CriticConfig(Section):
    """The critic of ``ppo.advantage: gae``: where its values come from and how it learns. A value head on the
    policy's own trunk (the default, one model in memory) reads features shaped for predicting the next token; a
    separate critic (a model of its own, as verl and OpenRLHF train) shapes its trunk for the values alone."""

    separate: bool = True
    """A critic model of its own (as verl, OpenRLHF and TRL's last PPO trainer have): a copy of the policy's initial
    model (or ``critic.model``) with a value head, trained by the value loss alone; with ``lora``, its own adapter of
    the same settings. Costs a second model's weights and forward and backward passes. False: a value head on the
    policy's own trunk (one model; its features are the next token's, and on the calculator demo its explained
    variance stayed below 0: docs/ppo-details.md, item 8)."""
    model: TrainedModelConfig | None = None
    """Where a separate critic's initial weights come from (a reward model's output dir works: its trunk reads the
    whole episode); needs ``separate: true``. Null: the policy's initial weights."""
    learning_rate: float | None = Field(None, gt=0)
    """The critic's learning rate (the value head's, or the separate critic's), on the same schedule as the policy's.
    Null: ``optim.learning_rate``."""
    lam: float | None = Field(None, ge=0, le=1)
    """GAE's λ for the critic's targets (the returns it learns), apart from ``ppo.lam`` for the policy's advantages.
    1: Monte-Carlo returns, which do not lean on the critic's own values (VC-PPO's "decoupled GAE", Yuan et al.
    2025). Null: ``ppo.lam``."""
    warmup_steps: int = Field(0, ge=0)
    """The first N PPO steps train the critic alone: the policy does not move (its learning rate is 0 there) while
    the values fit the returns of its rollouts (OpenRLHF's freezing_actor_steps, verl's critic_warmup)."""


EVAL_METRICS = ("reward_mean", "reward_std", "pass@k", "response_length", "stopped_fraction", "tool_use_rate",
                "tool_calls_per_episode", "turns_per_episode", "submitted_fraction")


class EvalConfig(Section):
    """Held-out evaluation during the run, on the prompts of ``data.eval_path`` / ``data.eval_split`` /
    ``data.eval_fraction`` (a fraction is taken out of the training prompts), through the same reward and, with
    ``env``, the same text environment. Logged as ``eval/…`` in metrics.jsonl and trackers; costs no optimizer state
    and draws no training randomness (a run with eval trains exactly as one without)."""

    every: int | None = Field(None, gt=0)
    """Evaluate every N PPO steps; the last step is always evaluated. Null: only at the end."""
    at_start: bool = False
    """Also evaluate the initial policy, logged at step 0 (the baseline of the curve)."""
    samples_per_prompt: int = Field(1, gt=0)
    """k completions per prompt: ``eval/reward_mean`` is mean@k, ``eval/pass@k`` the fraction of prompts with at
    least one completion scoring ``pass_threshold`` or more."""
    pass_threshold: float = 1.0
    """The score at or above which a completion counts as solved (1.0 fits 0/1 rewards such as exact match)."""
    temperature: float = Field(0.0, ge=0)
    """0: greedy decoding (deterministic). Above 0: sampled, from a seeded stream of its own."""
    max_new_tokens: int | None = Field(None, gt=0)
    """A held-out response's budget (with ``env``: of each model turn). Null: ``generation.max_new_tokens``."""
    max_prompts: int | None = Field(None, gt=0)
    """Evaluate on the first N held-out prompts only."""
    batch_size: int = Field(16, gt=0)
    """Prompts per generation batch (each with its k completions). Batches are dealt to processes in turn and each
    is computed the same way whatever the process count, so results do not depend on it."""
    keep_best: str | None = None
    """Keep the policy of the best evaluation so far in ``OUTPUT_DIR/best`` (Hugging Face format, with
    ``best.json``: step, metric, value), by this metric: ``eval/reward_mean``, ``eval/pass@k`` or another ``eval/…``
    metric (``EVAL_METRICS``). The final model is the last step's either way: judge a recipe by it."""
    keep_best_mode: Literal["max", "min"] = "max"
    """Whether a larger (``max``) or smaller ``keep_best`` value is better."""


class PPOTrain(RunSettings):
    """Precision, checkpoints and samples of a PPO run."""

    sample_every: int = Field(10, gt=0)
    """Write a few (prompt, response, reward) rows to samples.jsonl every N steps."""
    samples_per_log: int = Field(4, gt=0)
    """Rows written to samples.jsonl each time."""


class PPORecipe(TrainerRecipe):
    """KL-penalised PPO with a value head (or a critic-free estimator: GRPO, RLOO, REINFORCE++), a frozen reference
    and a reward source."""

    model: ModelConfig
    """The policy (causal or seq2seq)."""
    ref_model: FrozenModelConfig | None = None
    """Reference model; default: a frozen copy of the initial policy (with LoRA: the base, adapter disabled). It
    reads the policy's tokens, so it uses the policy's tokenizer."""
    lora: LoraConfig | None = None
    data: PromptData
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    """How episodes are scored; may be left out when a stateful environment (``env.environment``) owns the reward."""
    kl: KLConfig = Field(default_factory=KLConfig)
    ppo: PPOAlgo = Field(default_factory=PPOAlgo)
    critic: CriticConfig = Field(default_factory=CriticConfig)
    """The value function of ``ppo.advantage: gae`` (refused with the critic-free estimators)."""
    train: PPOTrain = Field(default_factory=PPOTrain)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(learning_rate=1.41e-5))
    env: EnvConfig | None = None
    """Roll out through a text environment (tools); tool output gets no loss and no KL penalty."""
    eval: EvalConfig | None = None
    """Held-out evaluation during the run (default: at the end, greedy, when ``data`` has held-out prompts)."""

    @property
    def has_eval(self) -> bool:
        """True when the run evaluates: held-out prompts in ``data`` (the ``eval`` section then tunes how)."""
        d = self.data
        if d.reasoning_gym is not None:
            return d.reasoning_gym.eval_size > 0
        return d.eval_path is not None or d.eval_split is not None or d.eval_fraction > 0

    @model_validator(mode="after")
    def _sizes(self, info: ValidationInfo) -> "PPORecipe":
        p, procs = self.ppo, processes_of(info)
        problems = []
        if p.batch_size % p.mini_batch_size:
            problems.append(Problem("ppo.batch_size", f"ppo.batch_size={p.batch_size} must be a multiple of "
                                                      f"ppo.mini_batch_size={p.mini_batch_size}"))
        try:
            p.micro_batch_size, _ = share_micro_batch(p.mini_batch_size, p.micro_batch_size, procs,
                                                      "ppo.mini_batch_size", "ppo.micro_batch_size")
        except RecipeProblems as exc:
            problems += exc.problems
        gen = self.generation
        if gen.max_new_tokens is None:  # filled in here, so recipe.yaml shows what the run does
            gen.max_new_tokens = 32 if self.env is None else 64
        if gen.importance_sampling is None:  # filled in here, so recipe.yaml shows what the run does
            gen.importance_sampling = "none" if gen.engine == "local" else "token_truncate"
        if gen.min_new_tokens > gen.max_new_tokens:
            what = "no turn could end" if self.env is not None else "no response could end"
            problems.append(Problem("generation.min_new_tokens", f"generation.min_new_tokens={gen.min_new_tokens} "
                                                                 f"exceeds generation.max_new_tokens="
                                                                 f"{gen.max_new_tokens}: {what} before its budget"))
        if self.lora is not None and self.ref_model is not None:
            problems.append(Problem("ref_model", "ref_model must be omitted with lora: the reference is the base "
                                                 "model with the adapter disabled"))
        problems += self._estimator_problems(procs)
        problems += self._eval_problems()
        if problems:
            raise RecipeProblems(problems)
        return self

    def _eval_problems(self) -> list[Problem]:
        held_out = ("data.reasoning_gym.eval_size" if self.data.reasoning_gym is not None
                    else "data.eval_path, data.eval_split or data.eval_fraction")
        if not self.has_eval:
            if self.eval is not None and self.eval.keep_best is not None:
                return [Problem("eval.keep_best", f"keeping the best policy needs an evaluation, and so held-out "
                                                  f"prompts: set {held_out}")]
            if self.eval is not None:
                return [Problem("eval", f"evaluation needs held-out prompts: set {held_out}")]
            return []
        best = self.eval.keep_best if self.eval is not None else None
        if best is None:
            return []
        names = [f"eval/{m}" for m in EVAL_METRICS]
        k = (self.eval or EvalConfig()).samples_per_prompt
        if best.replace(f"pass@{k}", "pass@k") not in names:
            shown = ", ".join(n.replace("pass@k", f"pass@{k}") for n in names)
            return [Problem("eval.keep_best", f"{best!r} is not an evaluation metric; one of {shown}")]
        if self.env is None and best.split("/", 1)[1] in EVAL_METRICS[5:]:
            return [Problem("eval.keep_best", f"{best} is a text-environment metric; this recipe has no env")]
        return []

    def _estimator_problems(self, procs: int) -> list[Problem]:
        """Check the estimator's keys and fill the ones left unset with the estimator's defaults."""
        p, kl, problems = self.ppo, self.kl, []
        # the recipe is filled in once, here, so recipe.yaml shows the values the run uses
        p.advantage_scaling, p.loss_aggregation, kl.mode, kl.estimator = estimator_settings(p, kl)
        n = p.group_size
        if p.advantage in ("grpo", "rloo") and n < 2:
            problems.append(Problem("ppo.group_size", f"ppo.group_size={n}: {p.advantage} compares completions of the "
                                                      "same prompt, so it needs ppo.group_size >= 2 (4-16 is usual)"))
        if p.advantage == "gae" and p.advantage_scaling == "group":
            problems.append(Problem("ppo.advantage_scaling", "ppo.advantage_scaling=group scales by the spread of "
                                                             "a prompt's group of scores, which gae has no use for: "
                                                             "use batch (whitening) or none"))
        elif p.advantage_scaling == "group" and n < 2:
            problems.append(Problem("ppo.advantage_scaling",
                                    f"ppo.advantage_scaling=group needs ppo.group_size >= 2, got {n}"))
        if p.batch_size % (n * procs):
            problems.append(Problem("ppo.batch_size", f"ppo.batch_size={p.batch_size} must be a multiple of "
                                                      f"ppo.group_size × processes = {n} × {procs} = {n * procs} "
                                                      "(each process samples whole groups)"))
        if kl.mode == "loss" and kl.estimator in ("k1", "abs"):
            why = ("its gradient on tokens sampled from the policy is 0 in expectation (E_π[∇log π] = 0): the term "
                   "would cost compute and pull nothing" if kl.estimator == "k1" else
                   "its gradient is not the gradient of any KL")
            problems.append(Problem("kl.estimator", f"kl.estimator={kl.estimator} with kl.mode=loss: {why}. Use k3 "
                                                    "(gradient of KL(π_ref‖π), GRPO's) or k2 (gradient of "
                                                    f"KL(π‖π_ref)), or kl.mode=reward, where {kl.estimator} is a "
                                                    "per-token reward"))
        c = self.critic
        if c.model is not None and not c.separate:
            problems.append(Problem("critic.model", "critic.model sets a separate critic's weights: add "
                                                    "critic.separate: true"))
        if kl.mode == "loss" and kl.estimator == "full":
            problems.append(Problem("kl.estimator", "kl.estimator=full works only with kl.mode=reward (the loss term "
                                                    "needs a per-token estimate of the sampled tokens: k3 or k2)"))
        return problems

    @property
    def critic_free(self) -> bool:
        """True when no value head is trained (any estimator but gae)."""
        return self.ppo.advantage != "gae"
