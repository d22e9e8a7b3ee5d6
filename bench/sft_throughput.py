"""Benchmark SFT training throughput of a from-scratch model of real size: tokens/s, step time, peak memory, model
FLOPs per token and model-FLOP utilisation (MFU).

    python bench/sft_throughput.py                         # GPU: Qwen2-0.5B shape, seq 1024, micro-batch 8, bf16
    python bench/sft_throughput.py --gradient-checkpointing --json sft_gc.json
    python bench/sft_throughput.py --device cpu --seq-len 64 --micro-batch 2 --config hidden_size=64 \\
        intermediate_size=128 num_hidden_layers=2 num_attention_heads=2 num_key_value_heads=1 vocab_size=512

What runs is the inner loop of ``rlcli sft`` (rlcli/trainers/sft.py, step 4) on one process:

- the model is built from an architecture + config dict by ``rlcli.models.loading.load_model``, as for a recipe
  with ``model.architecture`` (float32 weights; ``model.gradient_checkpointing`` through the same function). The
  default config is Qwen2-0.5B's shape (24 layers, hidden 896, MLP 4864, 14 query / 2 key-value heads, vocab
  151936, tied embeddings; rope and the rest at transformers' qwen2 defaults). ``--config KEY=VALUE`` changes any
  field, checked by ``check_model_config`` like a recipe's ``model.config``. ``load_model`` sizes the vocabulary
  from the tokenizer, so it gets a stand-in that only has a length (``vocab_size``) and special-token ids;
- ``Accelerator(mixed_precision=...)`` as ``rlcli.parallel.Parallel`` builds it: bf16 autocast on GPU by default,
  float32 master weights, gradients and AdamW state; ``set_tf32`` as ``train.tf32`` (default on) sets it;
- AdamW and the LR schedule from ``make_optimizer`` with the recipe defaults (``OptimConfig()``), gradient
  clipping at ``max_grad_norm`` 1.0 through ``accelerator.clip_grad_norm_``;
- the loss is the trainer's: the model's token cross-entropy summed and divided by the number of target tokens of
  the whole optimizer step (``num_items_in_batch``), ``--grad-accum`` micro-batches per optimizer step.

The batches are SYNTHETIC: uniformly random token ids, every row full length (``--seq-len``), no padding, every
token a target. The loss therefore stays near ln(vocab); only the speed means anything.

Figures (each measured step ends with ``loss.item()`` as the trainer's logging does, and, on GPU,
``torch.cuda.synchronize()``):

  step time      median over ``--steps`` measured optimizer steps after ``--warmup`` unmeasured ones
  tokens/s       micro-batch × seq-len × grad-accum / median step time
  peak memory    ``torch.cuda.max_memory_allocated`` over the measured steps (GPU); ``ru_maxrss`` of the process (CPU)
  FLOPs/token    the PaLM-style model-FLOP count (Chowdhery et al. 2022, appendix B), forward + backward:

                     6·N + 12·L·H·T

                 N = non-embedding parameters + the LM-head matrix (vocab × hidden, counted once whether or not it is
                 tied to the input embedding: the lookup is no matmul, the head is); L = layers, H = query heads ×
                 head dim, T = sequence length. 12·L·H·T is QKᵀ and attention·V over the FULL T×T matrix (2 matmuls ×
                 2 FLOPs × T·H per token per layer forward, ×3 for forward + backward), i.e. causal masking is NOT
                 halved, as in PaLM; the JSON also holds the halved variant (6·L·H·T). Gradient checkpointing's
                 recomputed forward is not counted (model FLOPs, not hardware FLOPs), nor are norms, softmax, RoPE or
                 the optimizer.
  TFLOP/s        FLOPs/token × tokens/s
  MFU            achieved TFLOP/s / peak, two peaks: a dense ``torch.mm`` of ``--peak-size``³ (8192 on GPU, 1024 on
                 CPU) in the dtype the model's matmuls run in (bf16 under bf16 autocast, else float32 with the TF32
                 setting in force), measured in this process after the training steps; and, on GPU, the datasheet's
                 dense (no sparsity) tensor-core peak for that dtype when ``torch.cuda.get_device_name`` is a known
                 card (H100 SXM and H200: 989 TFLOP/s bf16)

On CPU a run whose estimated time (FLOPs / a quick fp32 matmul rate, before any weights exist) exceeds
``--max-cpu-minutes`` is refused with exit status 2; ``--force`` runs it anyway.

One BLAS thread unless ``--threads N`` or OMP_NUM_THREADS says otherwise.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import setup_threads

THREADS = setup_threads(sys.argv)

import argparse
import math
import statistics
import time

import torch
import yaml
from _common import environment, human, matmul_rate, peak_memory, print_table, sync, write_json

ARCHITECTURE = "qwen2"
QWEN2_05B = {  # Qwen/Qwen2-0.5B's shape; everything else (rope, norms, activation) at transformers' qwen2 defaults
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 32768,
}

# Datasheet dense (no sparsity) tensor-core peaks in TFLOP/s: (bf16, tf32, fp32 without tensor cores). The first
# name fragment found in torch.cuda.get_device_name() wins, so the more specific names come first.
DATASHEET_TFLOPS = (
    ("H100 PCIe", (756.0, 378.0, 51.2)),
    ("H100 NVL", (835.0, 417.5, 60.0)),
    ("H200 NVL", (835.0, 417.5, 60.0)),
    ("GH200", (989.4, 494.7, 66.9)),
    ("H200", (989.4, 494.7, 66.9)),
    ("H100", (989.4, 494.7, 66.9)),  # SXM5: "NVIDIA H100 80GB HBM3"
    ("A100", (312.0, 156.0, 19.5)),
)


class _VocabOnly:
    """What ``load_model`` reads from a tokenizer when it builds a model from scratch: its length and special ids."""

    pad_token_id, eos_token_id, bos_token_id = 0, 1, 2

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--architecture", default=ARCHITECTURE,
                        help=f"transformers model_type (default {ARCHITECTURE}; others start from their own defaults)")
    parser.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE",
                        help="model config overrides (values parse as YAML scalars), e.g. num_hidden_layers=2")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per row (default 1024)")
    parser.add_argument("--micro-batch", type=int, default=8, help="rows per forward pass (default 8)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    parser.add_argument("--steps", type=int, default=10, help="measured optimizer steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured optimizer steps first (default 3)")
    parser.add_argument("--mixed-precision", choices=["bf16", "no"], default=None,
                        help="train.mixed_precision (default: bf16 on cuda, no on cpu)")
    parser.add_argument("--no-tf32", dest="tf32", action="store_false", help="train.tf32=false (default: TF32 on)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="model.gradient_checkpointing=true")
    parser.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"], default="sdpa",
                        help="attention implementation (default sdpa; flash_attention_2 needs the flash-attn package)")
    parser.add_argument("--peak-size", type=int, default=None,
                        help="side of the peak matmul (default 8192 on GPU, 1024 on CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch / BLAS threads (default: $OMP_NUM_THREADS or 1)")
    parser.add_argument("--max-cpu-minutes", type=float, default=2.0,
                        help="on CPU, refuse runs estimated to take longer than this (default 2)")
    parser.add_argument("--force", action="store_true", help="run even when the CPU estimate says it is too slow")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if args.device == "cuda" else "no"
    if min(args.seq_len, args.micro_batch, args.grad_accum, args.steps) < 1 or args.warmup < 0:
        parser.error("--seq-len, --micro-batch, --grad-accum and --steps must be >= 1, --warmup >= 0")
    overrides = {}
    for item in args.config:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--config takes KEY=VALUE items, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    args.model_config = {**(QWEN2_05B if args.architecture == ARCHITECTURE else {}), **overrides}
    if args.peak_size is None:
        args.peak_size = 8192 if args.device == "cuda" else 1024
    return args


# --- model shape and FLOPs ------------------------------------------------------------------------------------


def shape_of(model) -> dict:
    """Parameter counts and the numbers of the FLOP formula, read from the module tree and the config."""
    cfg = model.config
    params = {id(p): p.numel() for p in model.parameters()}  # unique tensors: a tied head counts once
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings().weight
    tied = id(head) in embedding_ids
    total = sum(params.values())
    embeddings = sum(params[i] for i in embedding_ids)
    non_embedding = total - embeddings - (0 if tied else head.numel())
    layers = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {"total_params": total, "embedding_params": embeddings, "non_embedding_params": non_embedding,
            "lm_head_params": head.numel(), "tied_embeddings": tied, "flop_params": non_embedding + head.numel(),
            "layers": layers, "hidden": cfg.hidden_size, "heads": heads,
            "kv_heads": getattr(cfg, "num_key_value_heads", heads), "head_dim": head_dim,
            "attn_width": heads * head_dim, "ffn": getattr(cfg, "intermediate_size", None), "vocab": head.shape[0]}


def flops_per_token(shape: dict, seq_len: int) -> dict:
    """PaLM-style model FLOPs per token, forward + backward (see the module docstring)."""
    dense = 6 * shape["flop_params"]
    attention = 12 * shape["layers"] * shape["attn_width"] * seq_len
    return {"dense_6N": dense, "attention_12LHT": attention, "total": dense + attention,
            "total_causal_halved": dense + attention / 2}


def datasheet_peak(name: str, dtype: str) -> tuple[str, float] | None:
    column = {"bf16": 0, "tf32": 1, "fp32": 2}[dtype]
    for fragment, peaks in DATASHEET_TFLOPS:
        if fragment in name:
            return fragment, peaks[column] * 1e12
    return None


def matmul_peak(n: int, device: str, dtype: torch.dtype, min_seconds: float = 1.0) -> dict:
    """Sustained rate of a square ``n×n @ n×n`` product in ``dtype`` (2·n³ FLOPs each; _common.matmul_rate)."""
    return {"n": n, **matmul_rate(n, device, min_seconds, dtype=dtype)}


# --- the benchmark ---------------------------------------------------------------------------------------------


def build(args, meta: bool = False):
    from rlcli.config.common import ModelConfig
    from rlcli.models.loading import load_model

    cfg = ModelConfig(architecture=args.architecture, config=args.model_config,
                      gradient_checkpointing=args.gradient_checkpointing)
    vocab = _VocabOnly(int(args.model_config.get("vocab_size", 0)) or _default_vocab(args.architecture))
    if meta:  # shapes only, no memory, no init: for the parameter count and the CPU estimate
        with torch.device("meta"):
            return load_model(cfg, "causal", vocab)
    model = load_model(cfg, "causal", vocab)
    model.set_attn_implementation(args.attn)
    return model


def _default_vocab(architecture: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.for_model(architecture).vocab_size


def check_config(args) -> None:
    from rlcli.config.common import ModelConfig
    from rlcli.models.checks import check_model_config

    problems = check_model_config(ModelConfig(architecture=args.architecture, config=args.model_config), "causal")
    if problems:
        raise SystemExit("error: " + "; ".join(p.replace("model.config.", "--config ") for p in problems))


def cpu_estimate(args, shape: dict) -> dict:
    """Seconds the run would take on this CPU at the rate of a 1024³ fp32 matmul (an optimistic bound)."""
    rate = matmul_rate(1024, "cpu", 0.2)["flop_per_s"]
    tokens = args.micro_batch * args.seq_len * args.grad_accum
    step_flops = flops_per_token(shape, args.seq_len)["total"] * tokens
    seconds = step_flops * (args.steps + args.warmup) / rate
    state_bytes = 16 * shape["total_params"]  # fp32 weights + grads + two AdamW moments
    return {"matmul_flop_per_s": rate, "step_flops": step_flops, "seconds": seconds, "state_bytes": state_bytes}


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(THREADS)
    device = args.device

    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from rlcli.config.common import OptimConfig
    from rlcli.parallel import set_tf32
    from rlcli.optim import make_optimizer

    check_config(args)
    shape = shape_of(build(args, meta=True))
    flops = flops_per_token(shape, args.seq_len)
    tokens_per_step = args.micro_batch * args.seq_len * args.grad_accum
    print(f"rlcli SFT throughput: {args.architecture} {shape['total_params'] / 1e6:.1f} M parameters "
          f"({shape['non_embedding_params'] / 1e6:.1f} M non-embedding); {args.micro_batch} × {args.seq_len} tokens × "
          f"{args.grad_accum} micro-batch(es) per step; {args.warmup} warm-up + {args.steps} measured steps; device "
          f"{device}, mixed precision {args.mixed_precision}, {torch.get_num_threads()} thread(s)")
    if shape["total_params"] > 1e8 and device == "cpu":
        print(f"warning: a {shape['total_params'] / 1e6:.0f} M-parameter model on CPU; this benchmark is meant for a "
              "GPU (on CPU use a small --config, see --help)")
    if device == "cpu":
        est = cpu_estimate(args, shape)
        print(f"  CPU estimate: {human(est['step_flops'], 'FLOP')}/step at {human(est['matmul_flop_per_s'], 'FLOP/s')} "
              f"(1024³ fp32 matmul) ≈ {est['seconds'] / 60:.1f} min for {args.warmup + args.steps} steps, "
              f"≥ {est['state_bytes'] / 2**30:.1f} GiB for weights, gradients and AdamW state")
        if est["seconds"] > 60 * args.max_cpu_minutes and not args.force:
            print(f"refused: estimated {est['seconds'] / 60:.0f} min > --max-cpu-minutes {args.max_cpu_minutes:g}. Run "
                  "on a GPU, shrink the model (--config num_hidden_layers=2 hidden_size=64 ...), or pass --force.",
                  file=sys.stderr)
            return 2

    # as rlcli.parallel.Parallel does for a recipe (train.tf32, train.mixed_precision), on the chosen device
    set_tf32(args.tf32)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=args.mixed_precision)
    set_seed(args.seed, device_specific=True)
    t_build = time.perf_counter()
    try:
        model = build(args)
    except ImportError as exc:  # flash_attention_2 without the flash-attn package
        print(f"error: --attn {args.attn}: {exc}", file=sys.stderr)
        return 2
    total_steps = args.warmup + args.steps
    optimizer, scheduler = make_optimizer(model.parameters(), OptimConfig(), total_steps)
    max_grad_norm = OptimConfig().max_grad_norm
    model.train()
    model, optimizer = accelerator.prepare(model, optimizer)
    build_seconds = time.perf_counter() - t_build

    g = torch.Generator().manual_seed(args.seed)
    target_tokens = args.micro_batch * (args.seq_len - 1) * args.grad_accum  # labels[:, 1:] of every row
    step_seconds, losses = [], []
    error = None
    try:
        for step in range(1, total_steps + 1):
            if step == args.warmup + 1 and device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            batches = [torch.randint(0, shape["vocab"], (args.micro_batch, args.seq_len), generator=g)
                       for _ in range(args.grad_accum)]
            sync(device)
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=accelerator.device)
            for ids in batches:
                ids = ids.to(accelerator.device)
                loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids,
                             num_items_in_batch=target_tokens).loss
                accelerator.backward(loss)
                loss_sum += loss.detach()
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_loss = loss_sum.item()  # the trainer reads the loss every step for its log line
            sync(device)
            seconds = time.perf_counter() - t0
            if not math.isfinite(step_loss):
                raise RuntimeError(f"non-finite loss {step_loss} at step {step}")
            losses.append(step_loss)
            tag = "measured" if step > args.warmup else "warm-up"
            if step > args.warmup:
                step_seconds.append(seconds)
            print(f"  step {step} ({tag}): {seconds:.4f} s, loss {step_loss:.4f}, "
                  f"{tokens_per_step / seconds:,.0f} tokens/s")
    except torch.cuda.OutOfMemoryError as exc:
        error = (f"CUDA out of memory at micro-batch {args.micro_batch} × {args.seq_len}: lower --micro-batch or add "
                 f"--gradient-checkpointing ({str(exc).splitlines()[0]})")
    memory = peak_memory(device)
    del model, optimizer
    accelerator.free_memory()
    if device == "cuda":
        torch.cuda.empty_cache()

    result = {
        "architecture": args.architecture, "model_config": args.model_config, "shape": shape,
        "env": environment(device), "threads": torch.get_num_threads(),
        "settings": {"device": device, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
                     "grad_accum": args.grad_accum, "tokens_per_step": tokens_per_step, "warmup_steps": args.warmup,
                     "measured_steps": args.steps, "mixed_precision": args.mixed_precision, "tf32": args.tf32,
                     "gradient_checkpointing": args.gradient_checkpointing, "attn": args.attn,
                     "data": "synthetic: uniform random token ids, full length, no padding"},
        "build_seconds": build_seconds, "memory": memory, "flops_per_token": flops, "losses": losses,
        "step_seconds": step_seconds,
    }
    if error is not None:
        result["error"] = error
        print(f"error: {error}", file=sys.stderr)
        write_json(args.json, result)
        return 1

    # the peak, in the dtype the model's matmuls ran in, measured after the steps (clocks warm)
    matmul_dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
    sheet_dtype = "bf16" if matmul_dtype == torch.bfloat16 else ("tf32" if args.tf32 and device == "cuda" else "fp32")
    peak = matmul_peak(args.peak_size, device, matmul_dtype)
    median = statistics.median(step_seconds)
    tokens_per_s = tokens_per_step / median
    achieved = flops["total"] * tokens_per_s
    result.update({
        "step_seconds_median": median, "step_seconds_min": min(step_seconds), "step_seconds_max": max(step_seconds),
        "tokens_per_s": tokens_per_s, "achieved_flop_per_s": achieved,
        "achieved_flop_per_s_causal_halved": flops["total_causal_halved"] * tokens_per_s,
        "peak_measured": {**peak, "dtype_label": sheet_dtype}, "mfu_vs_measured": achieved / peak["flop_per_s"],
    })
    if device == "cuda":
        sheet = datasheet_peak(result["env"].get("gpu", ""), sheet_dtype)
        if sheet is not None:
            result["peak_datasheet"] = {"card": sheet[0], "dtype": sheet_dtype, "flop_per_s": sheet[1]}
            result["mfu_vs_datasheet"] = achieved / sheet[1]
    report(result)
    write_json(args.json, result)
    return 0


def report(r: dict) -> None:
    s, st, f = r["shape"], r["settings"], r["flops_per_token"]
    gpu = r["env"].get("gpu")
    mem = r["memory"]
    rows = [
        ("model", f"{r['architecture']}, {s['layers']} layers × hidden {s['hidden']}",
         f"{s['heads']} query / {s['kv_heads']} kv heads × {s['head_dim']}, MLP {s['ffn']}, vocab {s['vocab']:,}, "
         + ("tied embeddings" if s["tied_embeddings"] else "untied embeddings")),
        ("parameters", f"{s['total_params']:,}", (f"non-embedding {s['non_embedding_params']:,}; "
                                                 f"N for 6N (non-embedding + LM head) {s['flop_params']:,}")),
        ("device / threads", f"{st['device']}" + (f" ({gpu})" if gpu else "") + f" / {r['threads']}",
         f"torch {r['env']['torch']}, transformers {r['env'].get('transformers', '?')}"),
        ("precision", f"mixed_precision={st['mixed_precision']}"
         + (f", tf32={'on' if st['tf32'] else 'off'}" if st["device"] == "cuda" else ""),
         "float32 master weights, gradients and AdamW state"),
        ("attention / grad checkpointing", f"{st['attn']} / {'on' if st['gradient_checkpointing'] else 'off'}", ""),
        ("batch", f"{st['micro_batch']} × {st['seq_len']} × {st['grad_accum']} = {st['tokens_per_step']:,} tokens/step",
         "micro-batch × seq-len × accumulation; synthetic random ids, no padding"),
        None,
        ("step time (median)", f"{r['step_seconds_median'] * 1e3:.1f} ms",
         (f"min {r['step_seconds_min'] * 1e3:.1f}, max {r['step_seconds_max'] * 1e3:.1f} ms over "
          f"{st['measured_steps']} steps after {st['warmup_steps']} warm-up")),
        ("tokens/s", f"{r['tokens_per_s']:,.0f}", "tokens per step / median step time"),
        ("peak memory", (f"{mem['cuda_max_allocated_mib'] / 1024:.2f} GiB CUDA" if "cuda_max_allocated_mib" in mem
                         else f"{mem['cpu_max_rss_mib']:.0f} MiB RSS"),
         "torch.cuda.max_memory_allocated over the measured steps" if "cuda_max_allocated_mib" in mem
         else "ru_maxrss of the whole process"),
        ("loss first → last", f"{r['losses'][0]:.3f} → {r['losses'][-1]:.3f}",
         f"random tokens: ≈ ln(vocab) = {math.log(s['vocab']):.3f}"),
        None,
        ("model FLOPs / token", human(f["total"], "FLOP"),
         (f"6N = {human(f['dense_6N'], 'FLOP')} + 12·L·H·T = {human(f['attention_12LHT'], 'FLOP')} (full T×T; "
          f"causal-halved total {human(f['total_causal_halved'], 'FLOP')})")),
        ("achieved", human(r["achieved_flop_per_s"], "FLOP/s"),
         f"causal-halved count: {human(r['achieved_flop_per_s_causal_halved'], 'FLOP/s')}"),
        ("peak, measured", human(r["peak_measured"]["flop_per_s"], "FLOP/s"),
         f"torch.mm {r['peak_measured']['n']}³ {r['peak_measured']['dtype']}"
         + (" (TF32 on)" if r["peak_measured"]["dtype_label"] == "tf32" else "") + ", same process, after the steps"),
        ("MFU vs measured peak", f"{100 * r['mfu_vs_measured']:.1f}%", ""),
    ]
    if "peak_datasheet" in r:
        p = r["peak_datasheet"]
        rows += [("peak, datasheet", human(p["flop_per_s"], "FLOP/s"), f"{p['card']} dense {p['dtype']} (no sparsity)"),
                 ("MFU vs datasheet", f"{100 * r['mfu_vs_datasheet']:.1f}%", "")]
    elif st["device"] == "cuda":
        rows.append(("peak, datasheet", "unknown card", f"{gpu!r} is not in DATASHEET_TFLOPS"))
    print_table("rlcli SFT throughput", rows)


if __name__ == "__main__":
    sys.exit(main())
