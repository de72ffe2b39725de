"""Command line and typed configuration of ``visualrwkv train`` (SPEC §7).

Every flag of the original ``train.py`` is accepted with the same meaning and the same default,
so an original command runs with only the program name changed (``python train.py`` ->
``visualrwkv train``). Flags that only existed to describe the model (``--n_layer``, ``--n_embd``,
``--vocab_size``, ``--dim_att``, ``--dim_ffn``, ``--head_size_a``) are read off the checkpoint;
when given they are checked against it, and without a checkpoint they define a fresh model.

The parser never prints a traceback: a bad flag ends in one ``UserError`` line naming it.
Parsing imports nothing heavy (no torch, no Lightning), so mistakes are reported at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from visualrwkv.errors import UserError

# DDP's bucket_cap_mb for "one bucket": 1 TiB, larger than any gradient (DDP sizes its buckets to the parameters).
ONE_BUCKET_MB = 1 << 20
# DDP's bucket size where the buckets overlap the backward: the default, and --ddp_bucket_mb 0 across nodes.
OVERLAP_BUCKET_MB = 100

STAGE1_EXAMPLE = """\
  # stage 1 (pre-training): only the projector learns (--freeze_rwkv = n_layer)
  visualrwkv train --load_model RWKV-x060-World-1B6-v2.1-20240328-ctx4096.pth \\
      --wandb "" --proj_dir out/rwkv1b6_pretrain \\
      --data_file LLaVA-Pretrain/blip_laion_cc_sbu_558k.json --data_type json --vocab_size 65536 \\
      --ctx_len 1024 --epoch_steps 1000 --epoch_count 9 --epoch_begin 0 --epoch_save 0 \\
      --micro_bsz 16 --accumulate_grad_batches 2 --n_layer 24 --n_embd 2048 --pre_ffn 0 \\
      --lr_init 1e-3 --lr_final 1e-5 --warmup_steps 0 --beta1 0.9 --beta2 0.99 --adam_eps 1e-8 \\
      --accelerator gpu --devices 4 --precision bf16 --strategy deepspeed_stage_1 --grad_cp 0 \\
      --image_folder LLaVA-Pretrain/images/ --vision_tower_name openai/clip-vit-large-patch14-336 \\
      --freeze_rwkv 24 --detail low --grid_size -1 --image_position first --enable_progress_bar True"""

STAGE2_EXAMPLE = """\
  # stage 2 (visual instruction tuning): projector + RWKV learn, the embedding stays frozen
  visualrwkv train --model_path out/rwkv1b6_pretrain/rwkv-8.pth \\
      --wandb "" --proj_dir out/rwkv1b6_mix665k \\
      --data_file LLaVA-Instruct-150K/llava_v1_5_mix665k.json --data_type json --vocab_size 65536 \\
      --ctx_len 2048 --epoch_steps 1000 --epoch_count 10 --epoch_begin 0 --epoch_save 5 \\
      --micro_bsz 8 --accumulate_grad_batches 2 --n_layer 24 --n_embd 2048 --pre_ffn 0 \\
      --lr_init 6e-5 --lr_final 1.5e-5 --warmup_steps 0 --beta1 0.9 --beta2 0.99 --adam_eps 1e-8 \\
      --accelerator gpu --devices 8 --precision bf16 --strategy deepspeed_stage_1 --grad_cp 0 \\
      --image_folder LLaVA-Instruct-150K/images/ --vision_tower_name openai/clip-vit-large-patch14-336 \\
      --freeze_rwkv 0 --freeze_proj 0 --detail low --grid_size -1 --image_position middle \\
      --enable_progress_bar True"""

EPILOG = f"""examples:
{STAGE1_EXAMPLE}

{STAGE2_EXAMPLE}

outputs in --proj_dir: rwkv-<epoch>.pth (plain VisualRWKV weights), train_log.txt (one line per
epoch: epoch, loss, perplexity, lr, time), last.ckpt (resumable training state; starting again
with the same --proj_dir continues from it), logs/ (CSV metrics; TensorBoard when installed),
data_check.json (cached result of the data check).
"""

# Lightning precision strings for our names. "tf32" is fp32 weights with TF32 matmuls on Ampere+.
PRECISIONS: Dict[str, str] = {
    "fp32": "32-true", "tf32": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed",
    # Lightning's own names are accepted too.
    "32": "32-true", "32-true": "32-true", "16": "16-mixed", "16-mixed": "16-mixed", "16-true": "16-true",
    "bf16-mixed": "bf16-mixed", "bf16-true": "bf16-true",
}
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def str_to_bool(value: str) -> bool:
    """Lightning 1.x's flag parser accepted True/False, 1/0, yes/no (e.g. --enable_progress_bar True)."""
    v = str(value).strip().lower()
    if v in ("1", "true", "t", "yes", "y", "on"):
        return True
    if v in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def parse_devices(value: str) -> Union[int, str]:
    """``--devices`` as Lightning takes it: a count (``4``), ``-1``/``auto`` (all), or ids (``0,1``)."""
    v = str(value).strip()
    if v == "auto":
        return v
    try:
        return int(v)
    except ValueError:
        pass
    parts = [p for p in v.split(",") if p.strip()]
    if parts and all(p.strip().isdigit() for p in parts):
        return v
    raise argparse.ArgumentTypeError(f"expected a number of devices, -1, 'auto' or ids like 0,1; got {value!r}")


@dataclass
class TrainConfig:
    """All settings of one training run. Field names are the original flag names."""

    # ---- model sources (SPEC §7): --load_model = RWKV .pth (stage 1), --model_path = VisualRWKV .pth
    load_model: str = ""
    model_path: Optional[str] = None
    vision_tower_name: str = "openai/clip-vit-base-patch32"
    # ---- model dimensions: checked against the checkpoint, or define a model trained from scratch
    vocab_size: int = 0  # 0 = from the checkpoint (65536 from scratch)
    n_layer: Optional[int] = None  # None = from the checkpoint (6 from scratch, as the original)
    n_embd: Optional[int] = None  # None = from the checkpoint (512 from scratch)
    dim_att: int = 0  # 0 = n_embd (RWKV-6 needs dim_att == n_embd)
    dim_ffn: int = 0  # 0 = int(3.5 * n_embd) // 32 * 32
    head_size_a: Optional[int] = None  # None = from the checkpoint (64 from scratch)
    head_size_divisor: int = 8  # only 8 (fixed in the ln_x eps of x060)
    pre_ffn: int = 0  # only 0 (x060 has no pre-ffn variant)
    dropout: float = 0.0  # dropout on the block-0 input, as the original
    grid_size: int = 8
    detail: str = "low"
    image_position: str = "first"
    # ---- data
    proj_dir: str = "out"
    data_file: str = ""
    data_type: str = "json"
    image_folder: str = "images"
    ctx_len: int = 1024
    bad_records: str = "error"  # error: refuse up front listing ids; skip: leave them out, count them
    num_workers: int = -1  # -1 = 0 on CPU, min(4, cores per device) on GPU
    # ---- schedule
    epoch_steps: int = 1000
    epoch_count: int = 500
    epoch_begin: int = 0
    epoch_save: int = 5
    micro_bsz: int = 12
    accumulate_grad_batches: int = 1
    max_steps: int = -1  # stop after this many optimizer steps (resumable); -1 = run all epochs
    lr_init: float = 6e-4
    lr_final: float = 1e-5
    warmup_steps: int = -1
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    weight_decay_final: float = -1.0
    grad_cp: int = 0
    random_seed: int = -1
    # ---- what learns
    freeze_rwkv: int = 0
    freeze_proj: int = 0
    train_vit: int = 0  # 1 = train the vision tower too (for small towers such as the quickstart's)
    pack: int = -1  # 1 = pack each micro-batch's samples into one row (no compute on padding); -1 = on for CUDA
    compile: int = 0  # 1 = torch.compile every RWKV block and a frozen tower (GPU; the WKV kernel stays uncompiled)
    act_budget: float = 1.0  # with --compile 1: fraction of the blocks' activations kept for backward
    fused_norm_gate: int = 1  # with --compile 1: ln_x + gate as fused Triton kernels (0 = inductor's GroupNorm)
    wkv_op: int = 1  # with --compile 1: fla's WKV kernels as custom ops inside the block graphs (0 = graph break)
    wkv_keep_states: int = 1  # with --wkv_op 1: fla's chunk states kept from the WKV forward for its backward
    tune_kernels: int = 0  # with --compile 1: inductor's coordinate-descent tuning of its Triton kernels
    # ---- hardware
    accelerator: str = "auto"
    devices: Union[int, str] = 1
    num_nodes: int = 1
    precision: Optional[str] = None  # None = bf16 on a CUDA GPU with bf16, else fp32
    strategy: str = "auto"
    ds_bucket_mb: int = 200
    # with --strategy ddp: gradient all-reduce bucket size in MB; the buckets are all-reduced while the backward runs.
    # 0 = on one node one bucket, the whole gradient all-reduced once after the backward (100 MB across nodes). In
    # one call on 4 x H100 (r69, 1 GPU 312.4 ms) 100 MB buckets won on 2 GPUs, 344.2 ms (1.815x) vs one bucket
    # 352.1; on 4 GPUs (r68/r69) 358.4 vs 359.7. On a 2 x H100 host (r67, 1 GPU 308.8) one bucket took 340.7 ms.
    # torch's 25 MB gave 74 all-reduces per step that NCCL ran with its low-latency protocol at ~157 GB/s.
    ddp_bucket_mb: int = OVERLAP_BUCKET_MB
    ddp_grad_dtype: str = "fp32"  # with --strategy ddp: dtype of the gradient all-reduce (bf16 halves its bytes)
    # with --strategy ddp: NCCL's kernels on a high-priority CUDA stream (1), and at most this many CTAs (SMs) per
    # NCCL kernel (0 = NCCL's choice; -1, default = 8 where buckets overlap the backward, NCCL's choice for the one
    # bucket of --ddp_bucket_mb 0, which runs alone). Where they overlap, r63's DDP-4 profile (NCCL's defaults) had NCCL's kernels resident 316 ms of a
    # 461 ms step, holding SMs or waiting for them behind the backward's GEMMs. Both set (r64) against NCCL's
    # defaults (r63), 4 x H100, 100 MB buckets, 1 GPU 312.7 / 313.5 ms in each: DDP 4 355.5 vs 370.6 ms, DDP 2
    # 357.6 vs 386.2 ms.
    ddp_nccl_high_priority: int = 1
    ddp_nccl_ctas: int = -1
    # with --strategy ddp: the backward's matmuls leave this many SMs to the all-reduce kernels beside them
    # (train/strategies.py::BackwardGemmCarveout); 0 = every SM, as PyTorch does.
    ddp_gemm_sm_carveout: int = 0
    # with --strategy ddp: average the gradients in the all-reduce (NCCL's AVG, 1, default) instead of DDP's
    # division of every gradient before it, one kernel per parameter (0). With --ddp_grad_dtype bf16 its
    # own all-reduce hook averages instead. r69's DDP rows ran with it (not measured apart).
    ddp_avg_in_allreduce: int = 1
    master_weights: int = 0  # bf16 linear weights + fp32 masters in the optimizer (no per-step weight casts)
    # ---- logging / state
    wandb: str = ""
    run_name: str = ""
    enable_progress_bar: bool = True
    log_every_n_steps: int = 10
    save_state_every_steps: int = 0  # also write last.ckpt every N optimizer steps (0 = epoch ends only)
    resume: str = "auto"  # auto | yes | no | PATH of a last.ckpt

    # ---- derived (filled by finalize(); not flags)
    world_size: int = field(default=1, metadata={"derived": True})
    real_bsz: int = field(default=0, metadata={"derived": True})  # samples per micro-step, all ranks
    global_bsz: int = field(default=0, metadata={"derived": True})  # samples per optimizer step
    samples_per_epoch: int = field(default=0, metadata={"derived": True})
    optimizer_steps_per_epoch: int = field(default=0, metadata={"derived": True})
    total_optimizer_steps: int = field(default=0, metadata={"derived": True})
    decay_total_micro_steps: int = field(default=0, metadata={"derived": True})
    lightning_precision: str = field(default="32-true", metadata={"derived": True})

    # -----------------------------------------------------------------------------------------
    def finalize(self, world_size: int) -> "TrainConfig":
        """Fill the derived fields once the number of processes is known."""
        self.world_size = int(world_size)
        self.real_bsz = self.micro_bsz * self.world_size  # the original's real_bsz (no accumulation)
        self.global_bsz = self.real_bsz * self.accumulate_grad_batches
        self.samples_per_epoch = self.epoch_steps * self.real_bsz
        # Lightning steps the optimizer at the end of an epoch even if the window is incomplete.
        self.optimizer_steps_per_epoch = math.ceil(self.epoch_steps / self.accumulate_grad_batches)
        self.total_optimizer_steps = self.optimizer_steps_per_epoch * self.epoch_count
        if self.max_steps > 0:
            self.total_optimizer_steps = min(self.total_optimizer_steps, self.max_steps)
        self.decay_total_micro_steps = (self.epoch_begin + self.epoch_count) * self.epoch_steps
        return self

    @property
    def ddp_one_bucket(self) -> bool:
        """--strategy ddp reduces the whole gradient in one all-reduce after the backward (--ddp_bucket_mb 0, one node)."""
        return self.ddp_bucket_mb == 0 and self.num_nodes == 1

    @property
    def ddp_bucket_cap_mb(self) -> float:
        """DDP's bucket_cap_mb for --ddp_bucket_mb: 0 = larger than any gradient on one node, 100 across nodes."""
        if self.ddp_bucket_mb:
            return float(self.ddp_bucket_mb)
        return float(ONE_BUCKET_MB if self.ddp_one_bucket else OVERLAP_BUCKET_MB)

    @property
    def ddp_max_ctas(self) -> int:
        """NCCL_MAX_CTAS for --ddp_nccl_ctas (0 = NCCL's choice): -1 = 8 where buckets overlap the backward."""
        if self.ddp_nccl_ctas >= 0:
            return self.ddp_nccl_ctas
        return 0 if self.ddp_one_bucket else 8

    def flags(self) -> Dict[str, Any]:
        """The settings as flags (derived fields left out), e.g. for train_log.txt and wandb."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("derived")}

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse that raises one UserError line (exit code 2 from the CLI) instead of usage + exit."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments:"):
            # Name the closest known flag for each typo.
            known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            hints = []
            for tok in message.split(":", 1)[1].split():
                if tok.startswith("--"):
                    close = difflib.get_close_matches(tok.split("=")[0], known, n=1)
                    if close:
                        hints.append(f"{tok} -> did you mean {close[0]}?")
            if hints:
                message += " (" + "; ".join(hints) + ")"
        raise UserError(f"{message} (see 'visualrwkv train --help')")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="visualrwkv train",
        description="Two-stage VisualRWKV training with the original train.py flags (SPEC §7). "
                    "Model dimensions are read from the checkpoint.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a typo must not silently match a longer flag
    )
    d = TrainConfig()
    g = p.add_argument_group("model")
    g.add_argument("--load_model", default=d.load_model, help="RWKV-6 .pth to start stage 1 from (fresh projector)")
    g.add_argument("--model_path", default=d.model_path, help="VisualRWKV .pth to continue from (stage 2)")
    g.add_argument("--vision_tower_name", default=d.vision_tower_name, help="CLIP/SigLIP hub name or local folder")
    g.add_argument("--vocab_size", type=int, default=d.vocab_size, help="checked against the checkpoint (0 = any)")
    g.add_argument("--n_layer", type=int, default=d.n_layer, help="checked against the checkpoint; "
                   "defines the model when training from scratch (default 6)")
    g.add_argument("--n_embd", type=int, default=d.n_embd, help="as --n_layer (default 512 from scratch)")
    g.add_argument("--dim_att", type=int, default=d.dim_att, help="0 = n_embd (the only value RWKV-6 allows)")
    g.add_argument("--dim_ffn", type=int, default=d.dim_ffn, help="0 = int(3.5 * n_embd) // 32 * 32")
    g.add_argument("--head_size_a", type=int, default=d.head_size_a, help="head size (64)")
    g.add_argument("--head_size_divisor", type=int, default=d.head_size_divisor, help="only 8")
    g.add_argument("--pre_ffn", type=int, default=d.pre_ffn, help="only 0")
    g.add_argument("--dropout", type=float, default=d.dropout, help="dropout on the input of block 0 (0 = off)")
    g.add_argument("--grid_size", type=int, default=d.grid_size,
                   help="image pooling: -1 all patches, 0 CLS, 1 mean, g>=2 a g x g grid (default 8)")
    g.add_argument("--detail", default=d.detail, help="low (high is not supported)")
    g.add_argument("--image_position", default=d.image_position, choices=["first", "middle", "last"])
    g.add_argument("--train_vit", type=int, default=d.train_vit, choices=[0, 1],
                   help="1 = train the vision tower too (small towers such as the quickstart's only)")

    g = p.add_argument_group("data")
    g.add_argument("--proj_dir", default=d.proj_dir)
    g.add_argument("--data_file", default=d.data_file, help="LLaVA JSON list or JSONL file")
    g.add_argument("--data_type", default=d.data_type, help="json (LLaVA JSON or JSONL)")
    g.add_argument("--image_folder", default=d.image_folder)
    g.add_argument("--ctx_len", type=int, default=d.ctx_len, help="longest sample, image expanded")
    g.add_argument("--bad_records", default=d.bad_records, choices=["error", "skip"],
                   help="records that fail the data check: error = refuse to start and list them; "
                        "skip = leave them out and count them in the log")
    g.add_argument("--num_workers", type=int, default=d.num_workers,
                   help="DataLoader workers per process (-1: 0 on CPU, up to 4 per GPU)")

    g = p.add_argument_group("schedule and optimizer")
    g.add_argument("--epoch_steps", type=int, default=d.epoch_steps, help="micro-batches per device per mini-epoch")
    g.add_argument("--epoch_count", type=int, default=d.epoch_count, help="mini-epochs to train")
    g.add_argument("--epoch_begin", type=int, default=d.epoch_begin, help="mini-epochs already trained (schedule, "
                   "sample order and file names continue from here)")
    g.add_argument("--epoch_save", type=int, default=d.epoch_save, help="save rwkv-<epoch>.pth every N epochs "
                   "(0 = only the last)")
    g.add_argument("--micro_bsz", type=int, default=d.micro_bsz, help="samples per device per micro-step")
    g.add_argument("--accumulate_grad_batches", type=int, default=d.accumulate_grad_batches)
    g.add_argument("--max_steps", type=int, default=d.max_steps,
                   help="stop after this many optimizer steps in all (the state is saved; run again to go on)")
    g.add_argument("--lr_init", type=float, default=d.lr_init)
    g.add_argument("--lr_final", type=float, default=d.lr_final)
    g.add_argument("--warmup_steps", type=int, default=d.warmup_steps)
    g.add_argument("--beta1", type=float, default=d.beta1)
    g.add_argument("--beta2", type=float, default=d.beta2)
    g.add_argument("--adam_eps", type=float, default=d.adam_eps)
    g.add_argument("--weight_decay", type=float, default=d.weight_decay,
                   help="AdamW decay of parameters with >= 2 non-trivial dims (0 = off)")
    g.add_argument("--weight_decay_final", type=float, default=d.weight_decay_final,
                   help="> 0: decay moves geometrically from --weight_decay to this over the schedule")
    g.add_argument("--grad_cp", type=int, default=d.grad_cp, choices=[0, 1], help="gradient checkpointing per block")
    g.add_argument("--pack", type=int, default=d.pack, choices=[-1, 0, 1],
                   help="1: run each micro-batch as one packed row (no compute on padding, same result); "
                        "-1 (default): on with CUDA, off on the CPU")
    g.add_argument("--compile", type=int, default=d.compile, choices=[0, 1],
                   help="1: torch.compile the RWKV blocks and a frozen vision tower (GPU training speed; slower start)")
    g.add_argument("--act_budget", type=float, default=d.act_budget,
                   help="with --compile 1 and --grad_cp 0: keep this fraction (0..1] of the compiled blocks' "
                        "activations for backward and recompute the cheapest rest (1 = keep all; 0.5 fits a "
                        "1.6B stage 2 at ctx_len 2048 x micro_bsz 8 on 80 GB at a fraction of --grad_cp 1's "
                        "recompute)")
    g.add_argument("--fused_norm_gate", type=int, default=d.fused_norm_gate, choices=[0, 1],
                   help="with --compile 1: ln_x (GroupNorm per head) and the output gate as fused Triton kernels "
                        "(same roundings; ~19 ms less kernel time per 1.6B stage-2 step on an H100); "
                        "0: inductor's GroupNorm")
    g.add_argument("--wkv_op", type=int, default=d.wkv_op, choices=[0, 1],
                   help="with --compile 1: packed WKV calls as custom ops inside the compiled block graphs, their "
                        "outputs kept for backward (1; a 1.6B stage-2 step on an H100 335 ms instead of 361, "
                        "45.2 GiB instead of 50.8); 0: a graph break around fla's kernels in every layer")
    g.add_argument("--wkv_keep_states", type=int, default=d.wkv_keep_states, choices=[0, 1],
                   help="with --wkv_op 1: the WKV forward keeps fla's chunk states and cumulative decays for the "
                        "backward instead of computing them again there (1; same results to the bit; a 1.6B "
                        "stage-2 step on an H100 ~313 ms instead of ~317, 54.2 GiB instead of 47.7); 0: recompute")
    g.add_argument("--tune_kernels", type=int, default=d.tune_kernels, choices=[0, 1],
                   help="with --compile 1: tune the block size and warps of every generated Triton kernel by "
                        "coordinate descent (torch._inductor.config.coordinate_descent_tuning): about 2.5 more "
                        "minutes of compilation at the start (cached for later runs); a 1.6B stage-2 step on an "
                        "H100 316.6 ms against 322.0 in one measurement, no consistent gain in later ones")
    g.add_argument("--random_seed", type=int, default=d.random_seed, help="-1 = no global seed (as the original)")
    g.add_argument("--freeze_rwkv", type=int, default=d.freeze_rwkv,
                   help="N = n_layer: freeze the whole language model (stage 1); N < n_layer: blocks 0..N-1")
    g.add_argument("--freeze_proj", type=int, default=d.freeze_proj, choices=[0, 1])

    g = p.add_argument_group("hardware (Lightning)")
    g.add_argument("--accelerator", default=d.accelerator, choices=list(ACCELERATORS))
    g.add_argument("--devices", type=parse_devices, default=d.devices, help="count, -1/auto, or ids like 0,1")
    g.add_argument("--num_nodes", type=int, default=d.num_nodes)
    g.add_argument("--precision", default=d.precision, choices=list(PRECISIONS),
                   help="fp32, tf32, fp16 or bf16 (default: bf16 on a CUDA GPU, else fp32)")
    g.add_argument("--strategy", default=d.strategy,
                   help="auto, ddp, fsdp, deepspeed_stage_1/2/3 (DeepSpeed must be installed), ...")
    g.add_argument("--ds_bucket_mb", type=int, default=d.ds_bucket_mb, help="DeepSpeed bucket size in MB")
    g.add_argument("--master_weights", type=int, default=d.master_weights, choices=[0, 1],
                   help="with --precision bf16: store the trainable linear weights in bf16 and their fp32 master "
                        "copies in the optimizer (1), instead of fp32 weights cast to bf16 in every forward and "
                        "their gradients cast back in every backward (0); the same arithmetic, fewer bytes moved. "
                        "Plain (single-device) or --strategy ddp (whose all-reduce then averages the bf16 "
                        "gradients in bf16, as --ddp_grad_dtype bf16), --accumulate_grad_batches 1")
    g.add_argument("--ddp_bucket_mb", type=int, default=d.ddp_bucket_mb,
                   help="with --strategy ddp: size of each gradient all-reduce bucket in MB (DDP's bucket_cap_mb); "
                        "the buckets are all-reduced while the backward runs (default 100). 0: on one node one "
                        "bucket, the whole gradient all-reduced once after the backward, so nothing runs beside its "
                        "matmuls (across nodes, --num_nodes > 1: 100 MB)")
    g.add_argument("--ddp_grad_dtype", default=d.ddp_grad_dtype, choices=["fp32", "bf16"],
                   help="with --strategy ddp: all-reduce the gradients in fp32 (exact average) or bf16 (half the "
                        "bytes between GPUs; each bucket rounded to bf16 once, as DeepSpeed's bf16 training "
                        "reduces them; the optimizer still updates fp32 weights)")

    g.add_argument("--ddp_nccl_high_priority", type=int, default=d.ddp_nccl_high_priority, choices=[0, 1],
                   help="with --strategy ddp: run NCCL's all-reduce kernels on a high-priority CUDA stream (1, default), "
                        "so their blocks get SMs ahead of the backward's kernels they overlap (PyTorch's "
                        "TORCH_NCCL_HIGH_PRIORITY, set for the process group); 0 = PyTorch's default stream priority")
    g.add_argument("--ddp_nccl_ctas", type=int, default=d.ddp_nccl_ctas,
                   help="with --strategy ddp: at most this many thread blocks (SMs) per NCCL kernel (NCCL_MAX_CTAS; "
                        "0 = NCCL's own choice; -1, default: 8 where buckets overlap the backward, so the all-reduces "
                        "hold fewer SMs (NCCL's own model for 8 channels on 4 x H100: ring all-reduce at 360 GB/s), "
                        "NCCL's choice for the one bucket of --ddp_bucket_mb 0)")
    g.add_argument("--ddp_gemm_sm_carveout", type=int, default=d.ddp_gemm_sm_carveout,
                   help="with --strategy ddp on GPUs: the backward's matmuls (through cuBLASLt) target this many "
                        "SMs fewer than the GPU has, leaving them to the all-reduce kernels that run beside them "
                        "(e.g. the --ddp_nccl_ctas value); 0 = every SM (PyTorch's default)")
    g.add_argument("--ddp_avg_in_allreduce", type=int, default=d.ddp_avg_in_allreduce, choices=[0, 1],
                   help="with --strategy ddp: average the gradients inside the all-reduce (NCCL's AVG, 1, default; the "
                        "same result to the bit for 2, 4, 8 ... processes) instead of DDP's division of every gradient "
                        "before it, one kernel per parameter (0); --ddp_grad_dtype bf16 averages in its own hook")
    g = p.add_argument_group("logging and state")
    g.add_argument("--wandb", default=d.wandb, help="Weights & Biases project ('' = off)")
    g.add_argument("--run_name", default=d.run_name, help="run name for wandb")
    g.add_argument("--enable_progress_bar", type=str_to_bool, default=d.enable_progress_bar)
    g.add_argument("--log_every_n_steps", type=int, default=d.log_every_n_steps,
                   help="optimizer steps between metric rows / progress-bar refreshes")
    g.add_argument("--save_state_every_steps", type=int, default=d.save_state_every_steps,
                   help="also write last.ckpt every N optimizer steps (0 = at epoch ends only)")
    g.add_argument("--resume", nargs="?", const="yes", default=d.resume,
                   help="auto (default): continue from PROJ_DIR/last.ckpt if it exists; --resume / yes: it must "
                        "exist; no: start fresh; or the path of a last.ckpt")
    return p


def parse_args(argv: Optional[List[str]] = None) -> TrainConfig:
    """Flags -> a checked TrainConfig. Raises UserError for unknown or contradictory flags."""
    ns = build_parser().parse_args(argv)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(ns).items() if k in names})
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Checks that need no file and no import: values out of range and contradictions."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise UserError(msg)

    if cfg.model_path == "":
        cfg.model_path = None
    need(not (cfg.load_model and cfg.model_path),
         "--load_model (an RWKV model, to start stage 1) and --model_path (a VisualRWKV model to continue from) "
         "were both given; give one of them")
    need(cfg.data_type in ("json", "jsonl"),
         f"--data_type {cfg.data_type!r} is not supported; VisualRWKV reads LLaVA json/jsonl records (--data_type json)")
    need(bool(cfg.data_file), "--data_file is required (a LLaVA JSON or JSONL file)")
    need(cfg.detail == "low",
         f"--detail {cfg.detail!r}: only 'low' is supported (the original's 'high' computed six crops and "
         "discarded them, SPEC §9)")
    need(cfg.pre_ffn == 0, "--pre_ffn must be 0: RWKV-6 (x060) has no pre-ffn variant")
    need(cfg.head_size_divisor == 8, "--head_size_divisor must be 8: it is fixed in the x060 checkpoints' ln_x eps")
    need(cfg.ctx_len >= 1, f"--ctx_len must be positive; got {cfg.ctx_len}")
    need(cfg.epoch_steps >= 1, f"--epoch_steps must be at least 1; got {cfg.epoch_steps}")
    need(cfg.epoch_count >= 1, f"--epoch_count must be at least 1; got {cfg.epoch_count}")
    need(cfg.epoch_begin >= 0, f"--epoch_begin must be >= 0; got {cfg.epoch_begin}")
    need(cfg.epoch_save >= 0, f"--epoch_save must be >= 0; got {cfg.epoch_save}")
    need(cfg.micro_bsz >= 1, f"--micro_bsz must be at least 1; got {cfg.micro_bsz}")
    need(cfg.accumulate_grad_batches >= 1,
         f"--accumulate_grad_batches must be at least 1; got {cfg.accumulate_grad_batches}")
    need(cfg.max_steps == -1 or cfg.max_steps >= 1, f"--max_steps must be -1 (off) or >= 1; got {cfg.max_steps}")
    need(cfg.lr_init >= 0 and cfg.lr_final >= 0, "--lr_init and --lr_final must be >= 0")
    need(0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1, "--beta1 and --beta2 must be in [0, 1)")
    need(cfg.adam_eps > 0, f"--adam_eps must be > 0; got {cfg.adam_eps}")
    need(cfg.weight_decay >= 0, f"--weight_decay must be >= 0; got {cfg.weight_decay}")
    need(not (cfg.weight_decay_final > 0 and cfg.weight_decay <= 0),
         f"--weight_decay_final {cfg.weight_decay_final} needs --weight_decay > 0 (decay only moves from "
         "--weight_decay to --weight_decay_final)")
    need(0 <= cfg.dropout < 1, f"--dropout must be in [0, 1); got {cfg.dropout}")
    need(0 < cfg.act_budget <= 1, f"--act_budget must be in (0, 1]; got {cfg.act_budget}")
    need(cfg.act_budget == 1 or (cfg.compile and not cfg.grad_cp),
         f"--act_budget {cfg.act_budget} applies to the compiled blocks without checkpointing: it needs "
         f"--compile 1 and --grad_cp 0 (got --compile {cfg.compile} --grad_cp {cfg.grad_cp})")
    need(not cfg.tune_kernels or cfg.compile, "--tune_kernels 1 tunes the compiled blocks' kernels: it needs --compile 1")
    need(cfg.freeze_rwkv >= 0, f"--freeze_rwkv must be >= 0; got {cfg.freeze_rwkv}")
    if cfg.n_layer is not None:
        need(cfg.n_layer >= 1, f"--n_layer must be at least 1; got {cfg.n_layer}")
        need(cfg.freeze_rwkv <= cfg.n_layer,
             f"--freeze_rwkv {cfg.freeze_rwkv} is more than --n_layer {cfg.n_layer}")
    need(cfg.n_embd is None or cfg.n_embd >= 1, f"--n_embd must be positive; got {cfg.n_embd}")
    need(cfg.vocab_size >= 0, f"--vocab_size must be >= 0; got {cfg.vocab_size}")
    need(cfg.num_nodes >= 1, f"--num_nodes must be at least 1; got {cfg.num_nodes}")
    need(cfg.log_every_n_steps >= 1, f"--log_every_n_steps must be at least 1; got {cfg.log_every_n_steps}")
    need(cfg.save_state_every_steps >= 0, "--save_state_every_steps must be >= 0")
    need(cfg.ds_bucket_mb >= 1, "--ds_bucket_mb must be positive")
    need(cfg.ddp_bucket_mb >= 0, f"--ddp_bucket_mb must be 0 (one bucket on one node) or more; got {cfg.ddp_bucket_mb}")
    need(0 <= cfg.ddp_gemm_sm_carveout <= 64,
         f"--ddp_gemm_sm_carveout must be 0 (every SM) to 64; got {cfg.ddp_gemm_sm_carveout}")
    need(cfg.ddp_gemm_sm_carveout == 0 or cfg.strategy == "ddp",
         f"--ddp_gemm_sm_carveout applies to --strategy ddp (got --strategy {cfg.strategy})")
    need(-1 <= cfg.ddp_nccl_ctas <= 64,
         f"--ddp_nccl_ctas must be -1 (8 with overlapping buckets), 0 (NCCL's choice) or up to 64; got {cfg.ddp_nccl_ctas}")
    ddp_flags = ("ddp_bucket_mb", "ddp_nccl_high_priority", "ddp_nccl_ctas", "ddp_avg_in_allreduce")
    changed = [f"--{k} {getattr(cfg, k)}" for k in ddp_flags if getattr(cfg, k) != getattr(TrainConfig, k)]
    need(not changed or cfg.strategy == "ddp",
         f"{', '.join(changed)}: DDP settings, for --strategy ddp (got --strategy {cfg.strategy})")
    need(cfg.ddp_grad_dtype == "fp32" or cfg.strategy == "ddp",
         f"--ddp_grad_dtype {cfg.ddp_grad_dtype} applies to --strategy ddp (got --strategy {cfg.strategy}; "
         "DeepSpeed and FSDP reduce in their own precision)")
    if cfg.master_weights:
        need(cfg.precision in (None, "bf16", "bf16-mixed"),
             f"--master_weights 1 is for bf16 autocast training (--precision bf16); got --precision {cfg.precision}")
        need(cfg.accumulate_grad_batches == 1,
             f"--master_weights 1 keeps bf16 gradients, which would be summed in bf16 over micro-batches: use "
             f"--accumulate_grad_batches 1 (got {cfg.accumulate_grad_batches}) or --master_weights 0")
        need("deepspeed" not in cfg.strategy and "fsdp" not in cfg.strategy,
             f"--master_weights 1 works with a single device or --strategy ddp; --strategy {cfg.strategy} keeps its "
             "own master weights: use --master_weights 0")
    need(cfg.num_workers >= -1, f"--num_workers must be -1 (auto) or >= 0; got {cfg.num_workers}")
    if cfg.accelerator == "cpu":
        need(cfg.precision not in ("fp16", "16", "16-mixed", "16-true"),
             f"--precision {cfg.precision} needs a GPU; use fp32 or bf16 with --accelerator cpu")
        need("deepspeed" not in cfg.strategy and "fsdp" not in cfg.strategy,
             f"--strategy {cfg.strategy} needs GPUs; use ddp (or auto) with --accelerator cpu")
    need(cfg.strategy not in ("ddp_spawn", "ddp_notebook") and not cfg.strategy.startswith(("ddp_spawn", "ddp_notebook")),
         f"--strategy {cfg.strategy} is not supported (the data pipeline is not picklable); use ddp")
    resume_words = {"1": "yes", "true": "yes", "yes": "yes", "0": "no", "false": "no", "no": "no", "auto": "auto"}
    cfg.resume = resume_words.get(str(cfg.resume).lower(), cfg.resume)
    if cfg.resume not in ("auto", "yes", "no"):
        need(os.path.exists(cfg.resume), f"--resume {cfg.resume}: no such training state")
