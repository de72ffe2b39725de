"""Building the model to train and deciding what learns (SPEC §7).

Sources, as the original flags:

- ``--model_path M``: a VisualRWKV file (``rwkv.*``, ``proj.weight``, ``vit.*``), loaded strictly;
- ``--load_model R``: an RWKV-6 file; the tower comes from ``--vision_tower_name`` and the
  projector is new (stage 1);
- neither: a new RWKV-6 of the ``--n_layer/--n_embd/...`` flags with the published init (the
  quickstart trains a tiny one this way).

Freezing: the vision tower always (unless ``--train_vit 1``), the token embedding always;
``--freeze_rwkv N`` = n_layer freezes the whole language model, N < n_layer blocks 0..N-1;
``--freeze_proj 1`` the projector.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from visualrwkv.errors import UserError

SCRATCH_DEFAULTS = dict(n_layer=6, n_embd=512, vocab_size=65536, head_size=64)  # the original's defaults


def _check_dims(cfg, model_cfg, source: str) -> None:
    """The compatibility flags, when given, must agree with the checkpoint; one message for all."""
    wrong = []
    C = model_cfg.n_embd
    checks = [("n_layer", cfg.n_layer, model_cfg.n_layer), ("n_embd", cfg.n_embd, C),
              ("vocab_size", cfg.vocab_size or None, model_cfg.vocab_size),
              ("dim_att", cfg.dim_att or None, C), ("dim_ffn", cfg.dim_ffn or None, model_cfg.dim_ffn),
              ("head_size_a", cfg.head_size_a, model_cfg.head_size)]
    for flag, given, actual in checks:
        if given is not None and given != actual:
            wrong.append(f"--{flag} {given} (the model has {actual})")
    if wrong:
        raise UserError(f"{source} does not match the given model flags: {', '.join(wrong)}; the dimensions are "
                        "read from the checkpoint, so these flags can be left out")


def scratch_config(cfg):
    """RWKV6Config for a model trained from scratch, from the flags (original defaults)."""
    from visualrwkv.layers.rwkv6 import RWKV6Config

    n_embd = cfg.n_embd or SCRATCH_DEFAULTS["n_embd"]
    head = cfg.head_size_a or SCRATCH_DEFAULTS["head_size"]
    if cfg.dim_att and cfg.dim_att != n_embd:
        raise UserError(f"--dim_att {cfg.dim_att} must equal --n_embd {n_embd} for RWKV-6")
    try:
        return RWKV6Config(n_layer=cfg.n_layer or SCRATCH_DEFAULTS["n_layer"], n_embd=n_embd,
                           vocab_size=cfg.vocab_size or SCRATCH_DEFAULTS["vocab_size"], head_size=head,
                           dim_ffn=cfg.dim_ffn or None)
    except ValueError as e:
        raise UserError(str(e)) from None


def check_model_flags(cfg) -> None:
    """The model flags against the checkpoint, before anything is loaded or set up (``visualrwkv
    train`` calls it before building the Trainer, so a mistake is its only output line)."""
    # A bad --grid_size (too large a grid for the tower is found when the tower is known).
    if cfg.grid_size < -1:
        raise UserError(f"--grid_size must be -1, 0, 1 or >= 2; got {cfg.grid_size}")
    source = cfg.model_path or cfg.load_model
    if source:
        # Read the dimensions off the file (memory-mapped: no weights are read).
        from visualrwkv.checkpoint import config_from_state_dict, language_model_part, load_state_dict_file

        _check_dims(cfg, config_from_state_dict(language_model_part(load_state_dict_file(source)), source), source)


def build_model(cfg):
    """A VisualRWKV in float32 on the CPU (Lightning moves it and applies the precision). The caller
    has run ``check_model_flags(cfg)`` (``train`` does, before the Trainer), so no weights are loaded
    for flags that do not fit the checkpoint."""
    from visualrwkv.models.visualrwkv import VisualRWKV

    # The projector's init (and a model from scratch) depend on the seed; -1 (no global seed, as the
    # original) still gives a reproducible start.
    seed = cfg.random_seed if cfg.random_seed >= 0 else 0
    source = cfg.model_path or cfg.load_model
    try:
        if cfg.model_path:
            model = VisualRWKV.from_checkpoint(cfg.model_path, cfg.vision_tower_name, cfg.grid_size,
                                               dtype=torch.float32)
            source = cfg.model_path
        elif cfg.load_model:
            model = VisualRWKV.from_rwkv(cfg.load_model, cfg.vision_tower_name, cfg.grid_size,
                                         dtype=torch.float32, seed=seed)
            source = cfg.load_model
        else:
            from visualrwkv.models.rwkv6 import RWKV6

            rwkv = RWKV6(scratch_config(cfg)).init_weights(seed)
            model = VisualRWKV.from_rwkv(rwkv, cfg.vision_tower_name, cfg.grid_size, dtype=torch.float32, seed=seed)
            source = None
    except ValueError as e:  # e.g. a grid size larger than the tower's patch grid
        raise UserError(str(e)) from None
    if source is not None:
        _check_dims(cfg, model.rwkv.cfg, source)
    # From here on the flags describe the real model (logged in train_log.txt and the state).
    mc = model.rwkv.cfg
    cfg.n_layer, cfg.n_embd, cfg.vocab_size = mc.n_layer, mc.n_embd, mc.vocab_size
    cfg.dim_att, cfg.dim_ffn, cfg.head_size_a = mc.n_embd, mc.dim_ffn, mc.head_size
    return model


def apply_freezing(model, cfg) -> List[str]:
    """Set requires_grad by the freeze flags; returns the names of the trainable parameters."""
    L = model.rwkv.cfg.n_layer
    if cfg.freeze_rwkv > L:
        raise UserError(f"--freeze_rwkv {cfg.freeze_rwkv} is more than the model's {L} layers")
    model.requires_grad_(False)
    if cfg.freeze_rwkv < L:
        # Blocks from freeze_rwkv on, and the output side (ln_out, head). Never the embedding.
        for blk in model.rwkv.blocks[cfg.freeze_rwkv:]:
            blk.requires_grad_(True)
        model.rwkv.ln_out.requires_grad_(True)
        model.rwkv.head.requires_grad_(True)
    if not cfg.freeze_proj:
        model.proj.requires_grad_(True)
    if cfg.train_vit:
        if model.vit is None:
            raise UserError("--train_vit 1 but the model has no vision tower")
        model.freeze_vit = False  # encode_images then keeps the graph through the tower
        model.vit.requires_grad_(True)
    else:
        model.freeze_vit = True
        if model.vit is not None:
            model.vit.requires_grad_(False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise UserError(f"nothing to train: --freeze_rwkv {cfg.freeze_rwkv} freezes the whole language model and "
                        "--freeze_proj 1 the projector")
    return names


def add_input_dropout(model, p: float) -> Optional[torch.utils.hooks.RemovableHandle]:
    """The original's ``--dropout``: dropout on the spliced embeddings entering block 0 (training only).

    A forward pre-hook on block 0 rather than a change to the model, so inference code never sees
    it. With ``--grad_cp 1`` the block is re-run in backward with the same RNG state (checkpoint
    preserves it), so the mask is the same."""
    if p <= 0:
        return None
    block0 = model.rwkv.blocks[0]

    def hook(module: nn.Module, args):
        if not module.training:
            return None
        return (F.dropout(args[0], p=p, training=True),) + tuple(args[1:])

    return block0.register_forward_pre_hook(hook)


def compile_for_training(model, act_budget: float = 1.0, compile_vit: bool = True,
                         fused_norm_gate: bool = True, wkv_custom_op: bool = True, fused_mix: bool = False,
                         tune_kernels: bool = False, wkv_keep_states: bool = True) -> None:
    """torch.compile the RWKV blocks for GPU training (``--compile 1``).

    act_budget < 1 (``--act_budget``): the partitioner of every compiled graph keeps at most that
    fraction of the activations it would save and recomputes the rest in backward, cheapest first
    (elementwise work before matmuls): selective checkpointing inside the graphs. It is a process-wide
    setting of torch._functorch, read when the graphs compile.

    The blocks are compiled one by one, so DDP needs none of dynamo's "DDP optimizer", which
    splits a whole-model graph at gradient-bucket boundaries; on these per-block graphs (the WKV
    kernel is a graph break) that pass fails in torch 2.x ("'int' object has no attribute 'meta'",
    seen on 4 H100s), so it is switched off. DDP's gradient hooks still fire per parameter.

    compile_vit: also compile a frozen vision tower's forward in place (``nn.Module.compile``, so
    its state-dict keys stay as they are); eager, its ~360 small kernels per step are launched one
    by one and the GPU waits between them (2-13 ms of a 1.6B stage-2 step on an H100, measured with
    ``bench_train_gpu.py --compile_vit 0/1``; about 30 s more compilation at the start). A trainable
    tower (``--train_vit 1``) stays eager.

    fused_norm_gate: ln_x and the gate product as fused Triton kernels (``ops.norm_gate``, custom ops
    inside the compiled graphs) instead of inductor's GroupNorm: on an H100, 1.6B stage 2, their kernel
    time is 3.7 ms per step where inductor's group_norm kernels take 22.8 ms
    (``bench_train_gpu.py --fused_norm_gate 0/1 --profile``).

    wkv_custom_op: fla's WKV kernels as custom ops inside the compiled graphs (no graph break per
    layer; packed calls without state, i.e. training), their forward outputs kept for backward
    (``ops.partition``). On an H100, 1.6B stage 2 at --act_budget 0.5: 335 ms per step and 45.2 GiB,
    against 361 ms and 50.8 GiB with the graph break (``bench_train_gpu.py --wkv_op 0/1``, same call).

    fused_mix: the time mixing's LoRA output and interpolations as ``ops.maa_mix``'s fused kernels;
    opt-in: on an H100, 1.6B stage 2, 341.9 ms per step against 330.7 without (inductor fuses the
    unfused version with its neighbours; ``bench_train_gpu.py --fused_mix 0/1``, same call), 5.4 GiB less.

    wkv_keep_states (``--wkv_keep_states``): with wkv_custom_op, fla's chunk states and cumulative decays
    are kept from the WKV forward for its backward (three (T, C) float32 tensors more per layer) instead
    of computed again: same results to the bit; on an H100, 1.6B stage 2 with master weights through
    Lightning, 312.6 / 312.9 ms per step against 316.9 (WKV kernels 59.6 ms instead of 64.8), 54.2 GiB
    instead of 47.7 (``bench_train_gpu.py --wkv_keep 1/0``).

    tune_kernels (``--tune_kernels``): inductor's coordinate-descent tuning of its generated kernels'
    block sizes and warps (process-wide, read when the graphs compile); ~2.5 minutes more compilation. On an
    H100, 1.6B stage 2 with ``--master_weights 1``: 316.6 ms per step against 322.0 in one call, but
    319.1 / 325.5 against 321.3 / 321.6 through Lightning in a later one: no consistent gain."""
    import torch._dynamo
    import torch._inductor.config as inductor_config
    from torch._functorch import config as functorch_config

    torch._dynamo.config.optimize_ddp = False
    if tune_kernels:  # left as it is otherwise (bench_train_gpu.py --inductor may have set it)
        inductor_config.coordinate_descent_tuning = True
    functorch_config.activation_memory_budget = float(act_budget)
    model.rwkv.compile_blocks(fused_norm_gate=fused_norm_gate, wkv_custom_op=wkv_custom_op, fused_mix=fused_mix,
                              wkv_keep_states=wkv_keep_states)
    if compile_vit:
        compile_frozen_tower(model)


def compile_frozen_tower(model) -> bool:
    """torch.compile a frozen vision tower's forward in place (its state-dict keys are unchanged).
    Returns whether it did: a trainable tower is left eager."""
    if model.vit is None or not model.freeze_vit:
        return False
    model.vit.compile(dynamic=True)
    return True
