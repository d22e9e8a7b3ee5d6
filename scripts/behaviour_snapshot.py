"""Record what the tiny runs compute, to check that a refactor changed nothing (bit for bit on CPU).

    python scripts/behaviour_snapshot.py runs/snapshot-before.json              # record
    python scripts/behaviour_snapshot.py runs/snapshot-after.json --compare runs/snapshot-before.json

Runs, each short and from scratch: ``rlcli sft`` and ``rlcli rm`` on the tiny recipes (with a checkpoint and an
evaluation), ``rlcli ppo`` on the tiny PPO and GRPO recipes, the calculator PPO stage through its text environment
(on a briefly SFT-trained model) with RLOO, and ``rlcli env-rollout`` of that model. Records every logged metric
except timings, and the env-rollout episodes' token ids, masks and rewards. ``--compare`` exits 1 listing the first
differences.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIMING = ("time_", "tokens_per_s", "seconds", "episodes_per_s", "samples_per_s", "pairs_per_s")
SCRATCH = ["model.config.n_layer=2", "model.config.n_embd=64", "model.config.n_head=2"]


def _rlcli(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    done = subprocess.run([sys.executable, "-m", "rlcli", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"rlcli {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in rows]


def record(work: Path) -> dict:
    out: dict = {}
    common = ["logging.progress=false"]
    _rlcli("sft", "configs/tiny/sft.yaml", f"output_dir={work / 'sft'}", "train.max_steps=20", "train.save_every=10",
           "eval.every=10", *common)
    out["sft"] = _metrics(work / "sft")
    _rlcli("rm", "configs/tiny/rm.yaml", f"output_dir={work / 'rm'}", "train.max_steps=12", "train.save_every=6",
           "eval.every=6", *common)
    out["rm"] = _metrics(work / "rm")
    fast = ["ppo.steps=3", "ppo.batch_size=16", "ppo.mini_batch_size=8", "train.save_every=2", *SCRATCH, *common]
    _rlcli("ppo", "configs/tiny/ppo.yaml", f"output_dir={work / 'ppo'}", *fast)
    out["ppo"] = _metrics(work / "ppo")
    _rlcli("ppo", "configs/tiny/grpo.yaml", f"output_dir={work / 'grpo'}", *fast, "ppo.group_size=4")
    out["grpo"] = _metrics(work / "grpo")
    _rlcli("sft", "configs/calculator_sft.yaml", f"output_dir={work / 'calc-sft'}", "train.max_steps=30",
           "train.save_every=null", "eval.every=null", *SCRATCH, *common)
    _rlcli("ppo", "configs/calculator_rloo.yaml", f"model.name_or_path={work / 'calc-sft'}",
           f"output_dir={work / 'calc-ppo'}", "ppo.steps=2", "ppo.batch_size=16", "ppo.mini_batch_size=8",
           "train.save_every=null", "eval.max_prompts=16", *common)
    out["calculator"] = _metrics(work / "calc-ppo")
    _rlcli("env-rollout", "configs/calculator_eval.yaml", f"model.name_or_path={work / 'calc-sft'}",
           f"output_dir={work / 'rollout'}", "data.max_rows=12", "show=0")
    episodes = [json.loads(line) for line in (work / "rollout" / "episodes.jsonl").read_text().splitlines()]
    out["env_rollout"] = [{k: e[k] for k in ("token_ids", "token_mask", "tool_mask", "reward", "answer")}
                          for e in episodes]
    return out


def differences(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        found = [f"{path}.{k}: only in one" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            found += differences(a[k], b[k], f"{path}.{k}")
        return found
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b or (a != a and b != b) else [f"{path}: {a!r} vs {b!r}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--compare", type=Path, help="an earlier snapshot: exit 1 if this one differs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        snapshot = record(Path(work))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(snapshot, indent=1))
    print(f"wrote {args.out}")
    if args.compare:
        found = differences(json.loads(args.compare.read_text()), snapshot)
        if found:
            print(f"{len(found)} differences, the first:", *found[:20], sep="\n  ")
            return 1
        print(f"identical to {args.compare}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
