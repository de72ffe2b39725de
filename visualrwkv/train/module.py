"""The LightningModule: one training step of VisualRWKV, the optimizer, and the training state.

The step is kept lean: the batch statistics the logs need (tokens, samples, whether a batch has
an image or any supervised token) are read from the CPU batch *before* it is moved to the device,
so no step waits for the GPU just to count; the loss is kept on the device (logged every
``--log_every_n_steps``); the frozen vision tower runs under ``no_grad`` inside the model.

Training state (``last.ckpt``): for the single-process and DDP strategies the frozen weights are
left out of the file (stage 1 then saves megabytes, not the whole 1.6B model) and come back from
``--load_model`` / ``--model_path`` when resuming; a checksum of every frozen tensor is stored and
compared, so a resume with different frozen weights stops with a clear message instead of
training silently on another model. DeepSpeed leaves frozen weights out by itself; FSDP saves all.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence

import lightning.pytorch as pl
import torch

from visualrwkv.constants import IGNORE_INDEX
from visualrwkv.errors import UserError
from visualrwkv.train.optim import MasterAdamW, avg_allreduce_hook, bf16_allreduce_hook, clip_grad_norm_in_step_
from visualrwkv.train.schedule import param_groups

STATE_KEY = "visualrwkv"  # our entry in the Lightning checkpoint

# Wrapper names that strategies put in front of parameter names.
_WRAPPERS = re.compile(r"(_forward_module\.|_fsdp_wrapped_module\.|_checkpoint_wrapped_module\.|^module\.)")


def clean_keys(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Parameter names of a (possibly wrapped) module -> VisualRWKV names (rwkv.*, proj.*, vit.*)."""
    out = {}
    for k, v in sd.items():
        k = _WRAPPERS.sub("", k)
        if k.startswith("model."):
            k = k[len("model."):]
        out[k] = v
    from visualrwkv.models.visualrwkv import release_vit_keys

    return release_vit_keys(out)  # released tower names, whichever path gathered the weights


def state_name(param_name: str) -> str:
    """A parameter's name in the model's state dict (the tower's keys use the released layout)."""
    from visualrwkv.models.visualrwkv import release_vit_keys

    return next(iter(release_vit_keys({param_name: None})))


def _cpu_fused_adamw() -> bool:
    """Whether this PyTorch has the fused AdamW kernel for CPU tensors (2.4 and later)."""
    try:
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True)
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


def strategy_kind(strategy) -> str:
    """'deepspeed3', 'deepspeed', 'fsdp' or 'plain' (every process holds whole parameters)."""
    name = type(strategy).__name__.lower()
    if "deepspeed" in name:
        stage = (getattr(strategy, "config", None) or {}).get("zero_optimization", {}).get("stage", 0)
        return "deepspeed3" if stage == 3 else "deepspeed"
    if "fsdp" in name:
        return "fsdp"
    return "plain"


class VisualRWKVTrainModule(pl.LightningModule):
    def __init__(self, model, cfg, trainable_names: Sequence[str]):
        super().__init__()
        self.model = model  # VisualRWKV; its state dict is what rwkv-<epoch>.pth holds
        self.cfg = cfg
        self.trainable = sorted(trainable_names)
        self.n_image_tokens = model.n_image_tokens
        # Frozen weights are not in last.ckpt (see the module docstring), so loading is not strict;
        # on_load_checkpoint checks the keys itself.
        self.strict_loading = False
        self.group_is_decay: List[bool] = []
        self.pack = bool(cfg.pack) if cfg.pack >= 0 else torch.cuda.is_available() and cfg.accelerator != "cpu"
        # Filled per batch from the CPU batch (on_before_batch_transfer), read by the callback.
        self.batch_tokens = 0
        self.batch_samples = 0
        self._batch_has_image = True
        self._batch_supervised = True
        self.last_loss: Optional[torch.Tensor] = None
        from visualrwkv.train.strategies import BackwardGemmCarveout

        self.gemm_carveout = BackwardGemmCarveout(getattr(cfg, "ddp_gemm_sm_carveout", 0))

    # ------------------------------------------------------------------------------ step
    def on_before_batch_transfer(self, batch: Dict[str, Any], dataloader_idx: int) -> Dict[str, Any]:
        # CPU tensors here: counting costs no device synchronisation.
        if batch.get("empty"):
            self.batch_tokens = self.batch_samples = 0
            self._batch_has_image = self._batch_supervised = False
            return batch
        lengths, has = batch["lengths"], batch["has_image"]
        n_img = int(has.sum())
        # Tokens the model sees: text (placeholder counted once) + the image tokens it expands to.
        self.batch_tokens = int(lengths.sum()) + n_img * (self.n_image_tokens - 1)
        self.batch_samples = int(lengths.numel())
        self._batch_has_image = n_img > 0
        self._batch_supervised = bool((batch["labels"][:, 1:] != IGNORE_INDEX).any())
        # The splicing's host numbers from the CPU tensors, so the step on the GPU reads nothing back
        # (training_step passes them with the same tensors; has_image is not passed there).
        batch["splice_numbers"] = self.model.splice_numbers(batch["input_ids"], lengths, None, batch["labels"])
        return batch

    def _touch(self, params) -> torch.Tensor:
        """0 * (one element of each parameter): gives them a zero gradient so that DDP/ZeRO, which
        expect every trainable parameter to take part in every step, do not stall."""
        total = None
        for p in params:
            t = p.reshape(-1)[0] * 0.0
            total = t if total is None else total + t
        return total

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        if batch.get("empty"):
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            # Every sample of this micro-batch was dropped (e.g. an image deleted mid-run): a zero
            # step keeps the step count, the schedule and the processes in step.
            loss = self._touch(trainable)
            self.last_loss = None
            return loss
        out = self.model(input_ids=batch["input_ids"], labels=batch["labels"], pixel_values=batch["pixel_values"],
                         lengths=batch["lengths"], pack=self.pack, splice_numbers=batch.get("splice_numbers"))
        loss = out.loss  # mean over rows of each row's mean token loss (SPEC §5), L2Wrap attached
        self.last_loss = loss.detach()
        if self.trainer.world_size > 1:
            if not self._batch_supervised:  # nothing reached the head or the blocks
                loss = loss + self._touch(p for p in self.model.parameters() if p.requires_grad)
            elif not self._batch_has_image:
                # A text-only batch does not use the projector (nor a trainable tower).
                unused = [p for p in self.model.proj.parameters() if p.requires_grad]
                if self.model.vit is not None:
                    unused += [p for p in self.model.vit.parameters() if p.requires_grad]
                if unused:
                    loss = loss + self._touch(unused)
        return loss

    # ------------------------------------------------------------------------------ optimizer
    def on_train_start(self) -> None:
        # Lightning's per-step SIGTERM broadcast, read back without draining the GPU (strategies.py).
        from visualrwkv.train.strategies import install_lagged_sigterm_check

        install_lagged_sigterm_check(self.trainer)
        # --ddp_grad_dtype bf16 (optim.bf16_allreduce_hook). Registered here, on the DDP wrapper
        # Lightning has built by now, rather than through DDPStrategy(ddp_comm_hook=...), which
        # Lightning applies on CUDA only: this way the CPU test runs the same code.
        # --ddp_avg_in_allreduce 1 (optim.avg_allreduce_hook): the same, averaging inside the all-reduce.
        bf16 = getattr(self.cfg, "ddp_grad_dtype", "fp32") == "bf16"
        if bf16 or getattr(self.cfg, "ddp_avg_in_allreduce", 0):
            from torch.nn.parallel import DistributedDataParallel

            ddp = self.trainer.strategy.model
            if isinstance(ddp, DistributedDataParallel):
                ddp.register_comm_hook(state=None, hook=bf16_allreduce_hook if bf16 else avg_allreduce_hook)

    # The backward's matmuls leave SMs to the all-reduces beside them (--ddp_gemm_sm_carveout); the
    # forward keeps every SM. Both hooks run on every step, between them exactly the backward.
    def on_before_backward(self, loss: torch.Tensor) -> None:
        self.gemm_carveout.enter(self.device)

    def on_after_backward(self) -> None:
        self.gemm_carveout.exit()

    def configure_optimizers(self):
        cfg = self.cfg
        groups, _ = param_groups(self.model.named_parameters(), cfg.weight_decay)
        self.group_is_decay = [g["weight_decay"] > 0 for g in groups]
        betas = (cfg.beta1, cfg.beta2)
        kind = strategy_kind(self.trainer.strategy)
        if kind.startswith("deepspeed"):
            # DeepSpeed's fused Adam(W) kernels, as the original (CPU Adam when offloading).
            from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

            zero = self.trainer.strategy.config.get("zero_optimization", {})
            if zero.get("offload_optimizer") or zero.get("offload_param"):
                return DeepSpeedCPUAdam(groups, lr=cfg.lr_init, betas=betas, eps=cfg.adam_eps, bias_correction=True,
                                        adamw_mode=True, amsgrad=False)
            return FusedAdam(groups, lr=cfg.lr_init, betas=betas, eps=cfg.adam_eps, bias_correction=True,
                             adam_w_mode=True, amsgrad=False)
        # One fused kernel for all parameters (CUDA, and CPU where PyTorch has it: 7x faster than the
        # per-tensor loop for the tiny quickstart model, whose 65536-row head dominates the step; on
        # an H100 the 1.6B stage-2 step's optimizer time falls from 85 ms with foreach). Only fp16
        # mixed precision, whose gradient scaler must unscale before clipping, keeps the multi-tensor
        # (foreach) implementation: a fused optimizer unscales inside its own step.
        if getattr(cfg, "master_weights", 0):
            # bf16 linear weights (bf16_linear_weights_), fp32 masters here; clipping folded into its step.
            return MasterAdamW(groups, lr=cfg.lr_init, betas=betas, eps=cfg.adam_eps)
        cuda = self.device.type == "cuda"
        if self._has_grad_scaler():
            kw = {"foreach": True} if cuda else {}
        else:
            kw = {"fused": True} if (cuda or _cpu_fused_adamw()) else {}
        return torch.optim.AdamW(groups, lr=cfg.lr_init, betas=betas, eps=cfg.adam_eps, **kw)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Free the gradients as soon as they are used. Lightning zeroes them inside the next step's
        # closure, after training_step, so the next forward's activations would pile up on a full set
        # of last step's gradients (stage 2 at 1.6B on one GPU: +4.9 GiB of peak memory). Not where
        # freeing saves nothing: DeepSpeed keeps gradients in its own buffers, and DDP with
        # gradient_as_bucket_view (what --strategy ddp builds) keeps them in its all-reduce buckets.
        strategy = self.trainer.strategy
        in_buckets = bool(getattr(strategy, "_ddp_kwargs", {}).get("gradient_as_bucket_view"))
        if not (in_buckets or strategy_kind(strategy).startswith("deepspeed")):
            optimizer.zero_grad(set_to_none=True)

    def _has_grad_scaler(self) -> bool:
        return getattr(self.trainer.precision_plugin, "scaler", None) is not None

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if gradient_clip_val and strategy_kind(self.trainer.strategy) == "fsdp":
            # Each process holds a shard of every gradient: the norm must be taken over all shards,
            # which the root FSDP module does (torch.nn.utils.clip_grad_norm_ would clip per shard).
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        if gradient_clip_val and getattr(optimizer, "_step_supports_amp_scaling", False) \
                and not self._has_grad_scaler():
            # A fused optimizer under bf16 autocast: there is no scaler, so the gradients are already
            # true gradients and clipping them here is exact (Lightning's AMP plugin refuses any fused
            # optimizer because under fp16 it would clip scaled gradients). By norm, the scaling
            # itself happens inside the fused step.
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if gradient_clip_algorithm in (None, "norm"):
                clip_grad_norm_in_step_(optimizer, params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)

    # ------------------------------------------------------------------------------ state
    def _trims_state(self) -> bool:
        return strategy_kind(self.trainer.strategy) == "plain"

    def frozen_checksum(self) -> List[List[float]]:
        """[sum, L1 norm] in float64 of every frozen floating tensor, in name order: enough to tell
        two weight files apart, robust to where it is computed and to bf16/fp16 rounding."""
        trainable = {state_name(n) for n in self.trainable}
        stats = [torch.stack([t.detach().sum(dtype=torch.float64),
                              torch.linalg.vector_norm(t.detach(), ord=1, dtype=torch.float64)])
                 for n, t in sorted(self.model.state_dict().items()) if n not in trainable and t.is_floating_point()]
        return torch.stack(stats).cpu().tolist() if stats else []

    @staticmethod
    def _same_weights(now: List[List[float]], then: List[List[float]]) -> bool:
        # Rounding to bf16 moves a sum by far less than 0.1% of the L1 norm; another file by far more.
        return len(now) == len(then) and all(abs(a[0] - b[0]) <= 1e-3 * b[1] + 1e-6 and
                                             abs(a[1] - b[1]) <= 1e-3 * b[1] + 1e-6 for a, b in zip(now, then))

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        info: Dict[str, Any] = {"trainable": list(self.trainable), "trimmed": False}
        if self._trims_state() and "state_dict" in checkpoint:
            keep = {"model." + state_name(n) for n in self.trainable}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
            info["trimmed"] = True
            info["frozen_checksum"] = self.frozen_checksum()
        checkpoint[STATE_KEY] = info

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        info = checkpoint.get(STATE_KEY)
        if info is None:
            raise UserError("the training state is not from 'visualrwkv train' (no visualrwkv entry)")
        if list(info["trainable"]) != list(self.trainable):
            saved, now = set(info["trainable"]), set(self.trainable)
            diff = sorted(saved ^ now)
            raise UserError(f"the training state was saved with other trainable parameters (e.g. {', '.join(diff[:4])}); "
                            "use the same --freeze_rwkv / --freeze_proj / --train_vit, or --resume no to start fresh")
        if info.get("trimmed"):
            sd = checkpoint.get("state_dict", {})
            missing = [n for n in self.trainable if "model." + state_name(n) not in sd]
            if missing:
                raise UserError(f"the training state lacks trainable weights: {', '.join(missing[:4])}")
            if not self._same_weights(self.frozen_checksum(), info.get("frozen_checksum", [])):
                raise UserError("the frozen weights differ from the run that saved the training state: resume with "
                                "the same --load_model / --model_path / --vision_tower_name (and --random_seed for a "
                                "model trained from scratch), or --resume no to start fresh")

    def full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """The whole VisualRWKV state dict (rwkv.*, proj.weight, vit.*) on rank 0, gathered from
        the shards where the strategy shards parameters. Must be called on every rank."""
        kind = strategy_kind(self.trainer.strategy)
        if kind == "deepspeed3":
            sd = self.trainer.strategy.deepspeed_engine._zero3_consolidated_16bit_state_dict()
        elif kind == "fsdp":
            # Lightning's FSDP strategy (state_dict_type "full") gathers the root module's full state
            # dict onto rank 0; keys "model.rwkv...", cleaned below.
            sd = self.trainer.strategy.lightning_module_state_dict()
        else:
            sd = self.model.state_dict()
        if not self.trainer.is_global_zero or sd is None:
            return None
        return clean_keys(dict(sd))
