"""Run by tests/trainers/test_ppo_cli.py under torchrun: PPOLearner steps on fixed rollouts, the batch split over the
processes; rank 0 saves the weights. ``python ppo_two_process_step.py ESTIMATOR[:EPOCHS] OUT.pt`` (EPOCHS 2 by default;
grpo:1 takes pi_old from the training forward, PPOLearner.reuses_training_pass)."""

import sys
import copy
import torch
from accelerate import Accelerator
from rlcli.config.common import ModelConfig, OptimConfig
from rlcli.config.ppo import KLConfig, PPOAlgo
from rlcli.models.loading import load_model, load_tokenizer
from rlcli.models.value_head import ValueHead, ValueHeadModel, disable_dropout
from rlcli.rl import Rollout, SamplingRules
from rlcli.optim import make_optimizer
from rlcli.ppo.learner import PPOLearner
adv, _, epochs = sys.argv[1].partition(":"); out = sys.argv[2]
acc = Accelerator(cpu=True)
CFG = ModelConfig(architecture="gpt2", config={"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 128})
torch.manual_seed(0)
tok = load_tokenizer(CFG, "left"); lm = load_model(CFG, "causal", tok); disable_dropout(lm)
ref = ValueHeadModel(copy.deepcopy(lm).eval().requires_grad_(False), None)
policy = ValueHeadModel(lm, ValueHead(64) if adv == "gae" else None)
procs = acc.num_processes
algo = PPOAlgo(batch_size=32, mini_batch_size=32, micro_batch_size=16 // procs * 1, epochs=int(epochs or 2), advantage=adv, group_size=4 if adv != "gae" else 1)
opt, sched = make_optimizer(policy.parameters(), OptimConfig(learning_rate=1e-3), 100)
model, opt = acc.prepare(policy, opt)
learner = PPOLearner(model, ref_model=ref, algo=algo, kl=KLConfig(coef=0.1), rules=SamplingRules(), optimizer=opt, scheduler=sched, accelerator=acc, max_grad_norm=1.0)
g = torch.Generator().manual_seed(1)
q = torch.randint(3, 200, (32, 6), generator=g); qm = torch.ones_like(q)
lens = torch.randint(3, 12, (32,), generator=g)
r = torch.randint(3, 200, (32, 12), generator=g); rm = (torch.arange(12)[None] < lens[:, None]).long()
scores = torch.randn(32, generator=g)
rows = slice(acc.process_index * 32 // procs, (acc.process_index + 1) * 32 // procs)
ro = Rollout(q[rows], qm[rows], r[rows], rm[rows], torch.zeros_like(r[rows]))
assert learner.reuses_training_pass(ro.batch_size) == (epochs == "1")
for step in range(3):
    stats = learner.step(ro, scores[rows])
if acc.is_main_process:
    w = {k: v.detach().clone() for k, v in acc.unwrap_model(model).state_dict().items()}
    torch.save(w, out)
    print("procs", procs, "loss_policy", stats["loss_policy"], "kl", stats["kl"])
# as the command line does: free the DDP model, then destroy the process group (rlcli.launch.release_distributed);
# left to interpreter exit, gloo's teardown can abort ("terminate called without an active exception")
del learner, model, opt
from rlcli.launch import release_distributed

release_distributed()
