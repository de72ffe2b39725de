"""Unit tests of the training plumbing that needs no training run: flags, the deterministic sample
order, the lr / weight-decay schedule (against hand-computed values), optimizer groups."""
import math
import types

import pytest
import torch

from visualrwkv.errors import UserError
from visualrwkv.train.config import TrainConfig, build_parser, parse_args
from visualrwkv.train.schedule import (TrainSampler, magic_prime, nontrivial_dims, param_groups, record_index,
                                       records_read, schedule_at)

BASE = ["--data_file", "d.json"]


# ---------------------------------------------------------------------------------------------- flags
ORIGINAL_STAGE1 = """--load_model RWKV-x060-World-1B6-v2.1-20240328-ctx4096.pth --wandb "" --proj_dir out/rwkv1b5-v060_pretrain
 --data_file blip_laion_cc_sbu_558k.json --data_type json --vocab_size 65536
 --ctx_len 1024 --epoch_steps 1000 --epoch_count 9 --epoch_begin 0 --epoch_save 0
 --micro_bsz 16 --accumulate_grad_batches 2 --n_layer 24 --n_embd 2048 --pre_ffn 0
 --lr_init 1e-3 --lr_final 1e-5 --warmup_steps 0 --beta1 0.9 --beta2 0.99 --adam_eps 1e-8
 --accelerator gpu --devices 4 --precision bf16 --strategy deepspeed_stage_1 --grad_cp 0
 --image_folder images/ --vision_tower_name clip-vit-large-patch14-336
 --freeze_rwkv 24 --detail low --grid_size -1 --image_position first --enable_progress_bar True"""

ORIGINAL_STAGE2 = """--model_path out/rwkv7b-vitl336p14_pretrain/rwkv-17.pth --wandb "" --proj_dir out/x
 --data_file mix665k.json --data_type json --vocab_size 65536 --ctx_len 2048 --epoch_steps 1000
 --epoch_count 111 --epoch_begin 0 --epoch_save 20 --micro_bsz 1 --accumulate_grad_batches 22 --n_layer 32
 --n_embd 4096 --pre_ffn 0 --lr_init 2e-5 --lr_final 0 --warmup_steps 3330 --beta1 0.9 --beta2 0.99
 --adam_eps 1e-8 --accelerator gpu --devices 6 --precision bf16 --strategy deepspeed_stage_2 --grad_cp 0
 --image_folder images/ --vision_tower_name clip --freeze_rwkv 0 --freeze_proj 1 --detail low --grid_size -1
 --enable_progress_bar False"""


def _split(cmd):
    import shlex

    return shlex.split(cmd.replace("\n", " "))


def test_original_commands_parse_with_same_meaning():
    c = parse_args(_split(ORIGINAL_STAGE1))
    assert (c.load_model, c.model_path, c.wandb) == ("RWKV-x060-World-1B6-v2.1-20240328-ctx4096.pth", None, "")
    assert (c.ctx_len, c.epoch_steps, c.epoch_count, c.epoch_save, c.micro_bsz, c.accumulate_grad_batches) == \
        (1024, 1000, 9, 0, 16, 2)
    assert (c.n_layer, c.n_embd, c.vocab_size, c.freeze_rwkv, c.grid_size) == (24, 2048, 65536, 24, -1)
    assert (c.lr_init, c.lr_final, c.warmup_steps, c.beta2, c.adam_eps) == (1e-3, 1e-5, 0, 0.99, 1e-8)
    assert (c.devices, c.precision, c.strategy, c.image_position, c.enable_progress_bar) == \
        (4, "bf16", "deepspeed_stage_1", "first", True)
    c2 = parse_args(_split(ORIGINAL_STAGE2))
    assert c2.model_path.endswith("rwkv-17.pth") and c2.freeze_proj == 1 and c2.enable_progress_bar is False
    assert c2.lr_final == 0 and c2.accumulate_grad_batches == 22 and c2.image_position == "first"  # original default


def test_original_defaults_kept():
    c = parse_args(BASE)
    # train.py's defaults: the meaning of a command that leaves a flag out does not change.
    assert (c.grid_size, c.image_position, c.ctx_len, c.epoch_steps, c.epoch_count, c.epoch_save) == \
        (8, "first", 1024, 1000, 500, 5)
    assert (c.micro_bsz, c.lr_init, c.lr_final, c.warmup_steps, c.random_seed, c.weight_decay_final) == \
        (12, 6e-4, 1e-5, -1, -1, -1.0)
    assert c.n_layer is None and c.n_embd is None  # read from the checkpoint


def test_derived_fields():
    c = parse_args(BASE + ["--micro_bsz", "8", "--accumulate_grad_batches", "3", "--epoch_steps", "10",
                           "--epoch_count", "4", "--epoch_begin", "2"]).finalize(world_size=4)
    assert (c.real_bsz, c.global_bsz, c.samples_per_epoch) == (32, 96, 320)
    assert (c.optimizer_steps_per_epoch, c.total_optimizer_steps, c.decay_total_micro_steps) == (4, 16, 60)


@pytest.mark.parametrize("argv, words", [
    (["--lr_int", "1e-3"], ["--lr_int", "--lr_init"]),  # typo: named, with the closest flag
    (["--load_model", "a.pth", "--model_path", "b.pth"], ["--load_model", "--model_path"]),
    (["--weight_decay_final", "0.01"], ["--weight_decay_final", "--weight_decay"]),
    (["--detail", "high"], ["--detail"]),
    (["--pre_ffn", "1"], ["--pre_ffn"]),
    (["--n_layer", "4", "--freeze_rwkv", "5"], ["--freeze_rwkv", "--n_layer"]),
    (["--data_type", "binidx"], ["--data_type"]),
    (["--precision", "fp8"], ["--precision"]),
    (["--enable_progress_bar", "maybe"], ["--enable_progress_bar"]),
    (["--accelerator", "cpu", "--strategy", "deepspeed_stage_2"], ["--strategy"]),
    (["--micro_bsz", "0"], ["--micro_bsz"]),
    (["--lr", "1e-3"], ["--lr"]),  # no abbreviations
    (["--act_budget", "0.5"], ["--act_budget", "--compile 1"]),  # budget without compiled blocks
    (["--compile", "1", "--grad_cp", "1", "--act_budget", "0.5"], ["--act_budget", "--grad_cp 0"]),
    (["--compile", "1", "--act_budget", "0"], ["--act_budget"]),
])
def test_bad_flags_one_clear_message(argv, words):
    with pytest.raises(UserError) as e:
        parse_args(BASE + argv)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_act_budget_parses_with_compiled_blocks():
    assert parse_args(BASE + ["--compile", "1", "--act_budget", "0.5"]).act_budget == 0.5
    assert parse_args(BASE).act_budget == 1.0


def test_missing_data_file_flag():
    with pytest.raises(UserError, match="--data_file"):
        parse_args([])


def test_help_shows_both_stages(capsys):
    text = build_parser().format_help()
    assert "stage 1" in text and "stage 2" in text
    assert "visualrwkv train --load_model" in text and "visualrwkv train --model_path" in text
    assert "--freeze_rwkv 24" in text


# ---------------------------------------------------------------------------------------------- sample order
def test_magic_prime_hand_values():
    # largest prime p < n with p % 3 == 2
    assert [magic_prime(n) for n in (3, 4, 6, 10, 12, 100, 1000, 558128)] == [2, 2, 5, 5, 11, 89, 983, 558113]
    with pytest.raises(UserError):
        magic_prime(2)


def test_record_index_hand_values():
    n, p = 10, 5
    # first pass s < 5: k = s^3 mod 5 = 0, 1, 8%5=3, 27%5=2, 64%5=4 -> records[k]
    assert [record_index(s, n, p) for s in range(5)] == [0, 1, 3, 2, 4]
    # later s >= 5: k = 0, 1, 3, 2, 4 again -> reversed list = records[n - 1 - k]
    assert [record_index(s, n, p) for s in range(5, 10)] == [9, 8, 6, 7, 5]
    assert [record_index(s, n, p) for s in range(10, 12)] == [9, 8]


def test_sampler_ranks_epochs_and_position():
    # n=10, p=5; 2 ranks, micro_bsz 2, 2 micro-steps per mini-epoch -> 8 samples per mini-epoch
    r0 = TrainSampler(10, epoch_steps=2, micro_bsz=2, world_size=2, rank=0)
    r1 = TrainSampler(10, epoch_steps=2, micro_bsz=2, world_size=2, rank=1)
    assert len(r0) == 4
    assert list(r0) == [0, 3, 4, 8]  # s = 0, 2, 4, 6   (s=6: 216 % 5 = 1 -> 10-1-1)
    assert list(r1) == [1, 2, 9, 6]  # s = 1, 3, 5, 7
    r0.set_position(1, 0)
    assert list(r0) == [7, 9, 6, 5]  # s = 8, 10, 12, 14
    r0.set_position(0, 1)
    assert list(r0) == [4, 8]  # resumed after one micro-batch: the rest of mini-epoch 0
    # --epoch_begin shifts the global sample numbers like finished mini-epochs
    eb = TrainSampler(10, epoch_steps=2, micro_bsz=2, epoch_begin=1, world_size=2, rank=0)
    assert list(eb) == [7, 9, 6, 5]


def test_ranks_together_read_what_one_process_with_doubled_batch_reads():
    n, steps, micro = 37, 5, 3
    one = TrainSampler(n, steps, 2 * micro, world_size=1, rank=0)
    two = [TrainSampler(n, steps, micro, world_size=2, rank=r) for r in range(2)]
    for epoch in range(3):
        for s in [one] + two:
            s.set_position(epoch, 0)
        a = list(one)
        b = [list(x) for x in two]
        for step in range(steps):
            big = sorted(a[step * 2 * micro:(step + 1) * 2 * micro])
            small = sorted(b[0][step * micro:(step + 1) * micro] + b[1][step * micro:(step + 1) * micro])
            assert big == small


def test_records_read_matches_brute_force():
    for n, lo, hi in [(10, 0, 3), (10, 0, 40), (37, 5, 30), (37, 30, 50), (101, 0, 97), (101, 50, 400)]:
        p = magic_prime(n)
        assert records_read(n, lo, hi) == {record_index(s, n, p) for s in range(lo, hi)}


# ---------------------------------------------------------------------------------------------- schedule
KW = dict(lr_init=1e-3, lr_final=1e-5, epoch_begin=0, epoch_count=2, epoch_steps=10)


def test_lr_cosine_hand_values():
    # decay_total = 20, warmup 0: progress = (m + 1) / 20
    lr, wd, prog = schedule_at(0, warmup_steps=0, **KW)
    assert prog == pytest.approx(0.05)
    assert lr == pytest.approx(0.0009939057285945933, rel=1e-12)  # 1e-5 + 9.9e-4 * (1 + cos(0.05 pi)) / 2
    lr, _, prog = schedule_at(9, warmup_steps=0, **KW)
    assert prog == pytest.approx(0.5) and lr == pytest.approx(1e-5 + 9.9e-4 / 2, rel=1e-12)
    lr, _, prog = schedule_at(19, warmup_steps=0, **KW)
    assert prog == 1.0 and lr == pytest.approx(1e-5, rel=1e-12)
    lr, _, _ = schedule_at(25, warmup_steps=0, **KW)  # past the end: stays at lr_final
    assert lr == pytest.approx(1e-5, rel=1e-12)


def test_lr_epoch_begin_and_default_warmup():
    # epoch_begin 1: real_step = m + 10, decay_total = 30; warmup -1 (the default):
    # progress = (10 - (-1) + 1) / (30 - (-1)) = 12 / 31
    lr, _, prog = schedule_at(0, warmup_steps=-1, **{**KW, "epoch_begin": 1})
    assert prog == pytest.approx(12 / 31)
    assert lr == pytest.approx(0.000676916100158186, rel=1e-12)


def test_lr_warmup():
    # warmup 5: at real_step 2 progress = (2 - 5 + 1) / 15 < 0 -> 0, so lr = lr_init * (0.1 + 0.9 * 2 / 5)
    lr, _, _ = schedule_at(2, warmup_steps=5, **KW)
    assert lr == pytest.approx(1e-3 * 0.46, rel=1e-12)
    # constant lr (lr_final == lr_init) still warms up: 2e-4 * (0.1 + 0.9 * 2 / 5) = 9.2e-5
    lr, _, _ = schedule_at(2, warmup_steps=5, **{**KW, "lr_init": 2e-4, "lr_final": 2e-4})
    assert lr == pytest.approx(9.2e-5, rel=1e-12)
    lr, _, _ = schedule_at(7, warmup_steps=5, **{**KW, "lr_init": 2e-4, "lr_final": 2e-4})
    assert lr == 2e-4


def test_weight_decay_schedule():
    # wd 0.1 -> 0.01 geometric: at progress 0.5, 0.1 * (0.01 / 0.1) ** 0.5 = 0.0316227766...
    _, wd, prog = schedule_at(9, warmup_steps=0, weight_decay=0.1, weight_decay_final=0.01, **KW)
    assert prog == pytest.approx(0.5) and wd == pytest.approx(0.0316227766016838, rel=1e-12)
    _, wd, _ = schedule_at(9, warmup_steps=0, weight_decay=0.1, **KW)  # no final value: constant
    assert wd == 0.1


def _tiny_model(n_embd=128):
    from visualrwkv.layers.rwkv6 import RWKV6Config
    from visualrwkv.models.rwkv6 import RWKV6

    return RWKV6(RWKV6Config(n_layer=1, n_embd=n_embd, vocab_size=256))


def test_param_groups_weight_decay_by_shape():
    m = _tiny_model(128)  # time_faaaa is (2 heads, 64): two non-trivial dims -> decays
    m.emb.requires_grad_(False)
    groups, names = param_groups(m.named_parameters(), 0.1)
    decay, no_decay = set(names[0]), set(names[1])
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert {"blocks.0.att.key.weight", "blocks.0.att.time_maa_w1", "blocks.0.att.time_maa_w2",
            "blocks.0.att.time_decay_w1", "blocks.0.att.time_faaaa", "head.weight"} <= decay
    assert {"blocks.0.att.time_maa_x", "blocks.0.att.time_decay", "blocks.0.ln1.weight", "ln_out.bias",
            "blocks.0.ffn.time_maa_k"} <= no_decay
    assert "emb.weight" not in decay | no_decay  # frozen parameters are not in the optimizer
    for n, p in m.named_parameters():
        if n in decay:
            assert nontrivial_dims(p.shape) >= 2
    # time_faaaa of a one-head model is (1, 64): one non-trivial dim -> no decay
    _, names64 = param_groups(_tiny_model(64).named_parameters(), 0.1)
    assert "blocks.0.att.time_faaaa" in names64[1]
    # no weight decay at all: one group
    groups, names = param_groups(m.named_parameters(), 0.0)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0


def test_callback_sets_schedule_on_every_group():
    """The original skipped groups with weight decay when setting the lr (SPEC §9): ours does not."""
    from visualrwkv.train.callbacks import TrainCallback

    m = _tiny_model(128)
    cfg = TrainConfig(data_file="d.json", epoch_steps=10, epoch_count=2, accumulate_grad_batches=2, lr_init=1e-3,
                      lr_final=1e-5, warmup_steps=0, weight_decay=0.1, weight_decay_final=0.01)
    groups, _ = param_groups(m.named_parameters(), cfg.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr_init)
    cb = TrainCallback(cfg)
    sampler = TrainSampler(20, cfg.epoch_steps, 1)
    cb.bind(sampler)
    trainer = types.SimpleNamespace(optimizers=[opt])
    module = types.SimpleNamespace(group_is_decay=[True, False])
    sampler.set_position(0, 5)  # micro-batch 5 of an accumulation window of 2 -> window start 4
    cb.on_train_batch_start(trainer, module, None, 5)
    lr, wd, _ = schedule_at(4, lr_init=1e-3, lr_final=1e-5, warmup_steps=0, epoch_begin=0, epoch_count=2,
                            epoch_steps=10, weight_decay=0.1, weight_decay_final=0.01)
    assert lr == pytest.approx(1e-5 + 9.9e-4 * 0.5 * (1 + math.cos(math.pi * 5 / 20)), rel=1e-12)
    assert [g["lr"] for g in opt.param_groups] == [lr, lr]
    assert opt.param_groups[0]["weight_decay"] == wd and opt.param_groups[1]["weight_decay"] == 0.0


# ---------------------------------------------------------------------------------------------- hardware flags
@pytest.mark.parametrize("name, lightning, matmul", [
    ("fp32", "32-true", "highest"), ("tf32", "32-true", "high"), ("bf16", "bf16-mixed", "high"),
    ("fp16", "16-mixed", "high"), ("bf16-true", "bf16-true", "high")])
def test_precision_mapping(name, lightning, matmul):
    from visualrwkv.train.cli import _precision

    old = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)
    try:
        cfg = parse_args(BASE + ["--precision", name])
        assert _precision(cfg, cuda=False) == lightning
        assert torch.get_float32_matmul_precision() == matmul
        assert torch.backends.cuda.matmul.allow_tf32 == (matmul == "high")
    finally:
        torch.set_float32_matmul_precision(old[0])
        torch.backends.cuda.matmul.allow_tf32 = old[1]


def test_default_precision_on_cpu_is_fp32():
    from visualrwkv.train.cli import _precision

    old = torch.get_float32_matmul_precision()
    try:
        cfg = parse_args(BASE + ["--accelerator", "cpu"])
        assert _precision(cfg, cuda=False) == "32-true" and cfg.precision == "fp32"
    finally:
        torch.set_float32_matmul_precision(old)


def test_optional_extras_missing_give_one_clear_message():
    import importlib.util

    from visualrwkv.train.cli import _loggers, make_strategy

    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(UserError, match=r"deepspeed_stage_2 needs DeepSpeed.*pip install"):
            make_strategy(parse_args(BASE + ["--strategy", "deepspeed_stage_2"]))
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(UserError, match=r"--wandb myproj needs the wandb package"):
            _loggers(parse_args(BASE + ["--wandb", "myproj", "--proj_dir", "/tmp/visualrwkv-test-noop"]))
    with pytest.raises(UserError, match="--strategy ddq: unknown"):
        make_strategy(parse_args(BASE + ["--strategy", "ddq"]))
    from lightning.pytorch.strategies import DDPStrategy

    from visualrwkv.train.config import ONE_BUCKET_MB

    overlap = {"TORCH_NCCL_HIGH_PRIORITY": "1", "NCCL_MAX_CTAS": "8"}  # buckets beside the backward: 8 CTAs
    ddp = make_strategy(parse_args(BASE + ["--strategy", "ddp"]))  # the defaults
    assert isinstance(ddp, DDPStrategy) and ddp._ddp_kwargs["bucket_cap_mb"] == 100 and ddp.nccl_env == overlap
    assert ddp._ddp_kwargs["gradient_as_bucket_view"] and not ddp._ddp_kwargs["find_unused_parameters"]
    # no broadcast of the (constant) buffers before each forward, under whichever name this torch has
    assert ddp._ddp_kwargs.get("forward_sync_buffers", ddp._ddp_kwargs.get("broadcast_buffers")) is False
    one = make_strategy(parse_args(BASE + ["--strategy", "ddp", "--ddp_bucket_mb", "0"]))  # one node: one bucket
    assert one._ddp_kwargs["bucket_cap_mb"] == ONE_BUCKET_MB
    assert one.nccl_env == {"TORCH_NCCL_HIGH_PRIORITY": "1"}  # NCCL's own CTAs for the one all-reduce, alone
    nodes = make_strategy(parse_args(BASE + ["--strategy", "ddp", "--ddp_bucket_mb", "0", "--num_nodes", "2"]))
    assert nodes._ddp_kwargs["bucket_cap_mb"] == 100 and nodes.nccl_env == overlap  # across nodes: overlap
    plain = make_strategy(parse_args(BASE + ["--strategy", "ddp", "--ddp_bucket_mb", "25", "--ddp_nccl_high_priority",
                                             "0", "--ddp_nccl_ctas", "0"]))
    assert plain.nccl_env == {}  # PyTorch's and NCCL's own choices: the environment is left alone
    assert make_strategy(parse_args(BASE + ["--strategy", "ddp", "--ddp_nccl_ctas", "4"])).nccl_env["NCCL_MAX_CTAS"] == "4"
    for bad, msg in ((["--ddp_nccl_ctas", "4"], "--ddp_nccl_ctas 4: DDP settings, for --strategy ddp"),
                     (["--ddp_bucket_mb", "0", "--ddp_avg_in_allreduce", "0"],
                      "--ddp_bucket_mb 0, --ddp_avg_in_allreduce 0: DDP settings, for --strategy ddp"),
                     (["--strategy", "ddp", "--ddp_bucket_mb", "-1"], "--ddp_bucket_mb must be 0"),
                     (["--strategy", "ddp", "--ddp_nccl_ctas", "65"], "--ddp_nccl_ctas must be -1")):
        with pytest.raises(UserError, match=msg):
            parse_args(BASE + bad)
    assert make_strategy(parse_args(BASE)) == "auto"


def test_backward_gemm_carveout_only_on_gpus_and_restored():
    from visualrwkv.train.strategies import BackwardGemmCarveout

    before = (torch._C._get_sm_carveout_experimental(), torch.backends.cuda.preferred_blas_library())
    c = BackwardGemmCarveout(8)
    c.enter(torch.device("cpu"))  # a CPU step: nothing to leave to anyone
    assert (torch._C._get_sm_carveout_experimental(), torch.backends.cuda.preferred_blas_library()) == before
    c.exit()
    assert (torch._C._get_sm_carveout_experimental(), torch.backends.cuda.preferred_blas_library()) == before
    with pytest.raises(UserError, match="--ddp_gemm_sm_carveout applies to --strategy ddp"):
        parse_args(BASE + ["--ddp_gemm_sm_carveout", "8"])
    with pytest.raises(UserError, match="--ddp_gemm_sm_carveout must be 0"):
        parse_args(BASE + ["--strategy", "ddp", "--ddp_gemm_sm_carveout", "-1"])
    assert parse_args(BASE + ["--strategy", "ddp", "--ddp_gemm_sm_carveout", "8"]).ddp_gemm_sm_carveout == 8
    assert parse_args(BASE + ["--strategy", "ddp"]).ddp_avg_in_allreduce == 1  # the default
    assert parse_args(BASE + ["--strategy", "ddp", "--ddp_avg_in_allreduce", "0"]).ddp_avg_in_allreduce == 0
    # bf16 gradients: its own hook averages (test_train_optim), the flag is not an error
    assert parse_args(BASE + ["--strategy", "ddp", "--ddp_grad_dtype", "bf16"]).ddp_grad_dtype == "bf16"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_backward_gemm_carveout_on_gpu_sets_and_restores():
    from visualrwkv.train.strategies import BackwardGemmCarveout

    before = (torch._C._get_sm_carveout_experimental(), torch.backends.cuda.preferred_blas_library())
    c = BackwardGemmCarveout(8)
    a = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(256, 384, device="cuda", dtype=torch.bfloat16)
    c.enter(torch.device("cuda"))
    assert torch._C._get_sm_carveout_experimental() == 8
    assert torch.backends.cuda.preferred_blas_library() == torch._C._BlasBackend.Cublaslt
    out = a @ b  # cuBLASLt with an SM-count target: still the product
    c.exit()
    assert (torch._C._get_sm_carveout_experimental(), torch.backends.cuda.preferred_blas_library()) == before
    torch.testing.assert_close(out.float(), a.float() @ b.float(), rtol=2e-2, atol=2e-1)


def test_train_module_backward_hooks_enter_and_exit_the_carveout():
    from visualrwkv.train.module import VisualRWKVTrainModule

    calls = []

    class Recorder:
        sms = 8

        def enter(self, device):
            calls.append(("enter", device.type))

        def exit(self):
            calls.append(("exit",))

    import lightning.pytorch as pl

    m = VisualRWKVTrainModule.__new__(VisualRWKVTrainModule)  # only the two hooks are under test
    pl.LightningModule.__init__(m)
    m.gemm_carveout = Recorder()
    m.on_before_backward(torch.zeros(()))
    m.on_after_backward()
    assert calls == [("enter", "cpu"), ("exit",)]
