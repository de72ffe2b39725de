"""``visualrwkv train``: stage-1 / stage-2 training with the original train.py flags (SPEC §7).

    visualrwkv train --help            # every flag, with a stage-1 and a stage-2 example

Order of work: flags are checked first (no heavy import, so a typo fails at once); then the
Lightning Trainer is made (it knows the number of processes), the model is built and frozen, the
data every process will read is checked (once; cached in PROJ_DIR/data_check.json), and training
runs, resuming from PROJ_DIR/last.ckpt when it exists (``--resume``).

With ``--strategy ddp`` and several devices Lightning starts the other processes by running this
same command again; each of them builds the model and reads the cached data check.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import warnings
from typing import Any, Dict, List, Optional, Tuple

from visualrwkv.errors import UserError
from visualrwkv.train.config import PRECISIONS, TrainConfig, parse_args

# Settings that fix the sample order and what the saved state means: a resumed run must keep them.
_RESUME_MUST_MATCH = ("data_file", "image_folder", "image_position", "ctx_len", "grid_size", "micro_bsz",
                      "epoch_steps", "epoch_begin", "accumulate_grad_batches", "freeze_rwkv", "freeze_proj",
                      "train_vit", "bad_records")


def _is_main_process() -> bool:
    """Rank 0 before Lightning is set up (it sets these variables in the processes it starts)."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "0") not in ("", "0"):
            return False
    return os.environ.get("NODE_RANK", "0") in ("", "0")


def _say(msg: str) -> None:
    if _is_main_process():
        print(msg, file=sys.stderr, flush=True)


def _check_files(cfg: TrainConfig) -> None:
    """Missing inputs fail before anything is loaded."""
    if not os.path.isfile(cfg.data_file):
        raise UserError(f"--data_file {cfg.data_file}: file not found")
    for flag in ("load_model", "model_path"):
        path = getattr(cfg, flag)
        if path and not os.path.isfile(path):
            raise UserError(f"--{flag} {path}: file not found")
    if os.path.exists(cfg.proj_dir) and not os.path.isdir(cfg.proj_dir):
        raise UserError(f"--proj_dir {cfg.proj_dir} exists and is not a folder")


def _precision(cfg: TrainConfig, cuda: bool) -> str:
    import torch

    if cfg.precision is None:
        bf16 = cuda and cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_bf16_supported()
        cfg.precision = "bf16" if bf16 else "fp32"
    # tf32: fp32 weights, TF32 matmuls. The original also allowed TF32 for fp16/bf16 runs; only
    # fp32 keeps full-precision matmuls.
    fp32 = cfg.precision in ("fp32", "32", "32-true")
    torch.backends.cuda.matmul.allow_tf32 = not fp32
    torch.backends.cudnn.allow_tf32 = not fp32
    torch.set_float32_matmul_precision("highest" if fp32 else "high")
    return PRECISIONS[cfg.precision]


def make_strategy(cfg: TrainConfig):
    """The Lightning strategy object for --strategy (DDP, FSDP and DeepSpeed set up for this model)."""
    from lightning.pytorch.strategies import StrategyRegistry

    name = cfg.strategy
    if name.startswith("deepspeed"):
        if importlib.util.find_spec("deepspeed") is None:
            raise UserError(f"--strategy {name} needs DeepSpeed, which is not installed: "
                            "pip install 'visualrwkv[deepspeed]' (or use --strategy ddp)")
        if name not in StrategyRegistry:
            raise UserError(f"--strategy {name}: unknown DeepSpeed strategy; use deepspeed_stage_1, _2, _3 "
                            "(or _2_offload, _3_offload)")
        from lightning.pytorch.strategies import DeepSpeedStrategy

        params = dict(StrategyRegistry[name]["init_params"])
        bucket = int(cfg.ds_bucket_mb * 1000 * 1000)
        params.update(allgather_bucket_size=bucket, reduce_bucket_size=bucket,
                      # frozen weights come back from --load_model / --model_path on resume
                      exclude_frozen_parameters=True)
        return DeepSpeedStrategy(**params)
    if name in ("fsdp", "fsdp_cpu_offload"):
        from lightning.pytorch.strategies import FSDPStrategy

        from visualrwkv.layers.rwkv6 import Block

        # One FSDP unit per RWKV block, so parameters are gathered block by block.
        return FSDPStrategy(auto_wrap_policy={Block}, cpu_offload=name == "fsdp_cpu_offload", state_dict_type="full")
    if name == "ddp":
        from visualrwkv.train.strategies import NCCLTunedDDPStrategy, nccl_env, no_buffer_sync_kwargs

        # Every trainable parameter takes part in every step (module.py makes sure of it), so no
        # search for unused parameters; gradients live in the all-reduce buckets (less memory).
        # The all-reduce hook (--ddp_grad_dtype bf16, --ddp_avg_in_allreduce 1) is the module's (on_train_start).
        # The only buffers are constants every rank builds alike (the tower's position ids, (1, 577) int64),
        # so DDP's default broadcast of them from rank 0 before every forward (a 4616-byte collective in every
        # step of r64's NCCL log, and a meeting point of the ranks) is left out.
        return NCCLTunedDDPStrategy(nccl_env=nccl_env(cfg.ddp_nccl_high_priority, cfg.ddp_max_ctas),
                                    find_unused_parameters=False, gradient_as_bucket_view=True,
                                    bucket_cap_mb=cfg.ddp_bucket_cap_mb, **no_buffer_sync_kwargs())
    if name != "auto" and name not in StrategyRegistry:
        raise UserError(f"--strategy {name}: unknown; use auto, ddp, fsdp, deepspeed_stage_1, deepspeed_stage_2 or "
                        "deepspeed_stage_3 (or another strategy name registered in Lightning)")
    return name


def _loggers(cfg: TrainConfig) -> List[Any]:
    from lightning.pytorch.loggers import CSVLogger

    loggers: List[Any] = [CSVLogger(save_dir=cfg.proj_dir, name="logs")]
    if importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=cfg.proj_dir, name="tensorboard"))
    if cfg.wandb:
        if importlib.util.find_spec("wandb") is None:
            raise UserError(f"--wandb {cfg.wandb} needs the wandb package: pip install 'visualrwkv[wandb]' "
                            "(or leave --wandb out; CSV logs are always written)")
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(project=cfg.wandb, name=cfg.run_name or None, save_dir=cfg.proj_dir,
                                   config=cfg.flags()))
    return loggers


def _resume_path(cfg: TrainConfig) -> Optional[str]:
    from visualrwkv.train.callbacks import LAST_CKPT

    default = os.path.join(cfg.proj_dir, LAST_CKPT)
    if cfg.resume == "no":
        return None
    if cfg.resume == "auto":
        return default if os.path.exists(default) else None
    path = default if cfg.resume == "yes" else cfg.resume
    if not os.path.exists(path):
        raise UserError(f"--resume: no training state at {path}")
    return path


def read_saved_state(path: str) -> Dict[str, Any]:
    """Our callback's entry of a last.ckpt (a file, or a DeepSpeed checkpoint folder)."""
    import torch

    from visualrwkv.train.callbacks import TrainCallback

    try:
        if os.path.isdir(path):  # DeepSpeed: the client state sits beside the model states
            files = [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if f.endswith("model_states.pt")]
            if not files:
                raise UserError(f"{path} holds no DeepSpeed model states")
            ckpt = torch.load(sorted(files)[0], map_location="cpu", weights_only=False)
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read the training state {path}: {str(e).splitlines()[0]}") from None
    for key, value in (ckpt.get("callbacks") or {}).items():
        if key == TrainCallback.__qualname__ or key.startswith(TrainCallback.__qualname__):
            return value
    raise UserError(f"{path} is not a training state written by 'visualrwkv train'")


def _check_resume(cfg: TrainConfig, state: Dict[str, Any], path: str, world_size: int) -> None:
    saved = state.get("config", {})
    diffs = []
    for key in _RESUME_MUST_MATCH:
        a, b = saved.get(key), getattr(cfg, key)
        if key in ("data_file", "image_folder") and a and b:
            a, b = os.path.abspath(a), os.path.abspath(b)
        if key in saved and a != b:
            diffs.append(f"--{key} {getattr(cfg, key)} (saved: {saved.get(key)})")
    if state.get("world_size", world_size) != world_size:
        diffs.append(f"{world_size} processes (saved: {state.get('world_size')})")
    if diffs:
        raise UserError(f"{path} was saved by a run with other settings that fix the sample order: "
                        f"{'; '.join(diffs)}. Resume with the same settings, or start fresh with --resume no "
                        "(or another --proj_dir)")


def _micro_range(cfg: TrainConfig) -> Tuple[int, int]:
    """Global sample numbers [s_begin, s_end) of the whole planned run (all mini-epochs)."""
    per_micro = cfg.micro_bsz * cfg.world_size
    start = cfg.epoch_begin * cfg.epoch_steps
    return start * per_micro, (start + cfg.epoch_count * cfg.epoch_steps) * per_micro


# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainResult:
    trainer: Any  # the Lightning Trainer
    module: Any  # VisualRWKVTrainModule; .model is the trained VisualRWKV
    callback: Any  # TrainCallback; .epoch_losses are the mean losses of the mini-epochs of this run


def train(cfg: TrainConfig) -> Optional[TrainResult]:
    """Run training; None when the run in --proj_dir had already finished."""
    _check_files(cfg)
    import torch

    # Training a small model from scratch produces denormal gradients, and x86 arithmetic on them
    # is very slow (a tiny-model CPU step took ~15 s instead of ~1 s); values below 1e-38 do not
    # matter to any result here.
    torch.set_flush_denormal(True)
    # Heavy imports only now.
    # Lightning hints that do not apply: loading runs in the main process on purpose on CPU; the
    # frozen vision tower is in eval mode on purpose; short test runs log rarely.
    for pattern in (".*does not have many workers.*", ".*module\\(s\\) in eval mode.*",
                    ".*is smaller than the logging interval.*", ".*isinstance\\(treespec, LeafSpec\\).*"):
        warnings.filterwarnings("ignore", pattern)
    import lightning.pytorch as pl
    import torch
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from visualrwkv.train.callbacks import TrainCallback
    from visualrwkv.train.data import make_loader, prepare_records, resolve_num_workers
    from visualrwkv.train.model import (add_input_dropout, apply_freezing, build_model, check_model_flags,
                                        compile_for_training)
    from visualrwkv.train.module import VisualRWKVTrainModule
    from visualrwkv.train.schedule import TrainSampler

    try:  # one "Loading weights" bar per process per model is noise in a training log
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except (ImportError, AttributeError):
        pass
    check_model_flags(cfg)  # a mistake here is the only line printed: before the Trainer's banner
    os.makedirs(cfg.proj_dir, exist_ok=True)
    cuda = torch.cuda.is_available()
    cfg.lightning_precision = _precision(cfg, cuda)
    if cfg.master_weights and cfg.lightning_precision != "bf16-mixed":
        raise UserError(f"--master_weights 1 is for bf16 autocast training; this run's precision is {cfg.precision} "
                        "(pass --precision bf16, or --master_weights 0)")
    if cfg.ddp_gemm_sm_carveout and cuda:
        from visualrwkv.train.strategies import BackwardGemmCarveout

        if not BackwardGemmCarveout.supported():
            raise UserError(f"--ddp_gemm_sm_carveout {cfg.ddp_gemm_sm_carveout}: this PyTorch ({torch.__version__}) "
                            "has no SM carveout for matmuls; use --ddp_gemm_sm_carveout 0")
    strategy = make_strategy(cfg)
    loggers = _loggers(cfg)
    if cfg.random_seed >= 0:
        pl.seed_everything(cfg.random_seed, workers=True, verbose=False)

    resume = _resume_path(cfg)
    callback = TrainCallback(cfg, resume)  # the data is bound to it below, once it is prepared
    callbacks: List[Any] = [callback]
    if cfg.enable_progress_bar:
        from lightning.pytorch.callbacks import TQDMProgressBar

        # Refreshing reads the loss off the device: do it once per logging interval, not per step.
        callbacks.append(TQDMProgressBar(refresh_rate=cfg.log_every_n_steps * cfg.accumulate_grad_batches))
    try:
        trainer = pl.Trainer(
            accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=strategy,
            precision=cfg.lightning_precision, max_epochs=cfg.epoch_count, max_steps=cfg.max_steps,
            accumulate_grad_batches=cfg.accumulate_grad_batches, gradient_clip_val=1.0, gradient_clip_algorithm="norm",
            logger=loggers, callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=cfg.enable_progress_bar,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            log_every_n_steps=cfg.log_every_n_steps, use_distributed_sampler=False, default_root_dir=cfg.proj_dir,
        )
    except (MisconfigurationException, ValueError, RuntimeError) as e:
        raise UserError(f"cannot set up training on {cfg.accelerator} x {cfg.devices}: {str(e).splitlines()[0]}") from None
    cfg.finalize(trainer.world_size)
    is_main = trainer.is_global_zero

    if resume is not None:
        saved = read_saved_state(resume)
        _check_resume(cfg, saved, resume, trainer.world_size)
        if saved.get("done"):
            _say(f"training in {cfg.proj_dir} already finished ({resume}); nothing to do "
                 "(use another --proj_dir or --resume no to train again)")
            return None
        _say(f"resuming from {resume}: mini-epoch {cfg.epoch_begin + saved['epoch']}, micro-batch {saved['batch']}")
    elif os.path.exists(os.path.join(cfg.proj_dir, "last.ckpt")) and is_main:
        _say(f"--resume no: starting fresh; {cfg.proj_dir}/last.ckpt will be overwritten")

    # ---- model
    model = build_model(cfg)
    trainable = apply_freezing(model, cfg)
    if cfg.master_weights:
        from visualrwkv.train.optim import bf16_linear_weights_

        bf16_linear_weights_(model)  # before compiling: the graphs see the bf16 weights
    if cfg.grad_cp:
        model.rwkv.grad_cp = True
    if cfg.compile:
        if not cuda:
            raise UserError("--compile 1 needs a CUDA GPU (torch.compile of the blocks is for GPU training)")
        compile_for_training(model, cfg.act_budget, fused_norm_gate=bool(cfg.fused_norm_gate),
                             wkv_custom_op=bool(cfg.wkv_op), wkv_keep_states=bool(cfg.wkv_keep_states),
                             tune_kernels=bool(cfg.tune_kernels))
    add_input_dropout(model, cfg.dropout)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())

    # ---- data
    from visualrwkv.models.vision import load_image_processor
    from visualrwkv.tokenizer import get_tokenizer
    from visualrwkv.data.dataset import LlavaDataset

    tokenizer = get_tokenizer()
    processor = load_image_processor(cfg.vision_tower_name)
    s_begin, s_end = _micro_range(cfg)
    prep = prepare_records(cfg.data_file, cfg.image_folder, tokenizer, image_position=cfg.image_position,
                           ctx_len=cfg.ctx_len, n_image_tokens=model.n_image_tokens, s_begin=s_begin, s_end=s_end,
                           bad_records=cfg.bad_records, cache_dir=cfg.proj_dir, is_main=is_main)
    if resume is not None and saved.get("n_records") not in (None, len(prep.records)):
        raise UserError(f"the data now has {len(prep.records)} usable records, the saved run had "
                        f"{saved.get('n_records')}: the sample order would change; resume with the same data")
    # Records were checked above; an image that breaks later is skipped when read, never fatal.
    dataset = LlavaDataset(prep.records, cfg.image_folder, tokenizer, processor, image_position=cfg.image_position,
                           ctx_len=cfg.ctx_len, n_image_tokens=model.n_image_tokens, on_bad_record="skip",
                           check_image_files=False)
    sampler = TrainSampler(len(dataset), cfg.epoch_steps, cfg.micro_bsz, cfg.epoch_begin, trainer.world_size,
                           trainer.global_rank)
    gpu = trainer.strategy.root_device.type == "cuda"
    workers = resolve_num_workers(cfg.num_workers, gpu, trainer.num_devices)
    loader = make_loader(dataset, sampler, cfg.micro_bsz, workers, pin_memory=gpu)

    data_info: Dict[str, Any] = {"file": cfg.data_file, "records": prep.n_file, "used": len(prep.records),
                                 "checked": prep.n_checked, "cut_after_image": prep.n_truncated}
    if prep.skipped or prep.n_invalid_lines:
        data_info["skipped_bad"] = len(prep.skipped) + prep.n_invalid_lines
        shown = ", ".join(f"{rid} ({kind})" for rid, kind, _ in prep.skipped[:10])
        _say(f"--bad_records skip: left out {len(prep.skipped)} record(s) that fail the data check"
             + (f" and {prep.n_invalid_lines} invalid JSON line(s)" if prep.n_invalid_lines else "")
             + (f": {shown}{' ...' if len(prep.skipped) > 10 else ''}" if shown else ""))
    callback.bind(sampler, dataset, data_info)

    module = VisualRWKVTrainModule(model, cfg, trainable)
    _say(f"visualrwkv train: {cfg.n_layer} layers x {cfg.n_embd}, {n_train / 1e6:.2f}M of {n_all / 1e6:.1f}M "
         f"parameters learn; {cfg.world_size} process(es) x micro_bsz {cfg.micro_bsz} x accumulate "
         f"{cfg.accumulate_grad_batches} = {cfg.global_bsz} samples per step; {cfg.epoch_count} mini-epoch(s) of "
         f"{cfg.epoch_steps} micro-steps; precision {cfg.precision}; strategy {cfg.strategy}; pack {int(module.pack)}; "
         f"data {len(prep.records)} records (check {prep.check_seconds:.1f}s); out {cfg.proj_dir}")
    try:
        trainer.fit(module, train_dataloaders=loader, ckpt_path=resume)
    except MisconfigurationException as e:
        raise UserError(str(e).splitlines()[0]) from None
    return TrainResult(trainer, module, callback)


def main(argv: Optional[List[str]] = None) -> int:
    cfg = parse_args(argv)
    train(cfg)
    return 0
