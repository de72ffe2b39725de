"""benchmarks/bench_train_gpu.py: exits cleanly without a GPU, and its --tiny mode runs on the CPU."""
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks", "bench_train_gpu.py")


def _run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, BENCH, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_bench_without_gpu_exits_cleanly():
    if torch.cuda.is_available():
        return  # on a GPU machine the default run is the real (long) benchmark
    r = _run()
    assert r.returncode == 0 and "no CUDA GPU" in r.stderr and "Traceback" not in r.stderr


def test_bench_tiny_smoke():
    r = _run("--tiny", "--lightning")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [l.split() for l in r.stdout.splitlines() if l.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["1", "2"]  # stage 1 and stage 2
    for row in rows:
        assert float(row[4]) > 0 and float(row[6]) > 0  # step_ms, tokens/s
    # the diagnostics of a slow run: time in Python's GC and the card's state (none here: a CPU)
    assert r.stderr.count("Python's cyclic GC in the timed steps: ") == 2
    assert r.stderr.count("rank 0's GPU near the end of the timed steps: n/a (not a CUDA device)") == 2
    # where each step's time goes (host clock here): the parts are positive and add up to about the step time
    import re

    phases = re.findall(r"rank 0's step, mean ms on the host: forward \+ loss ([\d.]+), backward ([\d.]+), "
                        r"optimizer \+ rest of the step ([\d.]+), between steps ([\d.]+) \(sum ([\d.]+) ms\)", r.stderr)
    assert len(phases) == 2
    for (fwd, bwd, rest, gap, total), row in zip(phases, rows):
        assert float(fwd) > 0 and float(bwd) > 0 and float(rest) > 0 and float(gap) >= 0
        assert abs(float(fwd) + float(bwd) + float(rest) + float(gap) - float(total)) < 0.25
        assert 0.6 < float(total) / float(row[4]) < 1.5, (total, row)  # against the row's step_ms
    # --ddp 1: the same step wrapped in DDP on one device (gloo here)
    r = _run("--tiny", "--lightning", "--ddp", "1", "--stages", "2", "--ddp_gemm_sm_carveout", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("x 1 (DDP, 100 MB buckets, NCCL stream priority high, 8 CTAs, backward matmuls leave 8 SMs, AVG in the "
            "all-reduce, lagged SIGTERM check);") in r.stdout  # train's DDP defaults
    r = _run("--tiny", "--lightning", "--ddp", "1", "--stages", "2", "--ddp_bucket_mb", "0", "--ddp_avg_in_allreduce", "0",
             "--lightning_sigterm")
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("x 1 (DDP, one bucket after the backward, NCCL stream priority high, NCCL-chosen CTAs, backward matmuls "
            "leave 0 SMs, DDP divides each gradient, Lightning SIGTERM check);") in r.stdout
    assert len([l for l in r.stdout.splitlines() if l.strip()[:1].isdigit()]) == 1
    r = _run("--tiny")
    assert r.returncode == 0 and len([l for l in r.stdout.splitlines() if l.strip()[:1].isdigit()]) == 2
    assert r.stderr.count("GPU near the end of the timed steps: n/a (not a CUDA device)") == 2


def test_bench_real_lengths_cycle_batches(tmp_path):
    # --lengths_from a LLaVA data file (tokenised as training does) and several distinct batches.
    import json

    recs = [{"id": str(i), "image": "x.jpg", "conversations": [
        {"from": "human", "value": "<image>\n" + "word " * (3 + 4 * i)}, {"from": "gpt", "value": "ok " * (2 + i)}]}
        for i in range(6)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(recs))
    r = _run("--tiny", "--stages", "2", "--batches", "3", "--lengths_from", str(path), "--text_min", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "text lengths of data.json" in r.stdout and "3 distinct batch(es)" in r.stdout
    rows = [l.split() for l in r.stdout.splitlines() if l.strip()[:1].isdigit()]
    assert len(rows) == 1 and float(rows[0][4]) > 0
    assert int(rows[0][3]) <= 32 + 1 + 16  # longest row: at most text_len plus the tiny tower's 17 tokens - 1


def test_bench_bad_lengths_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a list"}')
    for path in (str(tmp_path / "missing.json"), str(bad)):
        r = _run("--tiny", "--lengths_from", path)
        assert r.returncode == 2 and "--lengths_from" in r.stderr and "Traceback" not in r.stderr


def test_profile_tables_idle_and_exposed_communication():
    # gpu_profile's interval arithmetic on made-up kernel spans (us): two compute kernels 0-100 and
    # 150-300, one all-reduce 80-200 on its own stream (overlapped except 100-150) and one 320-400
    # after all compute (exposed). Idle: 300-320 is a gap before the second all-reduce.
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from gpu_profile import _category, communication_overlap, idle_gaps

    spans = [(0, 100, "nvjet_sm90_gemm"), (150, 300, "triton_poi_fused_add"),
             (80, 200, "ncclDevKernel_AllReduce_Sum_f32_RING_LL"), (320, 400, "ncclDevKernel_AllReduce_Sum_bf16")]
    assert _category(spans[2][2]) == "communication (NCCL)"
    total, exposed = communication_overlap(spans)
    assert (total, exposed) == (200.0, 50.0 + 80.0)
    lines = idle_gaps(spans, min_us=10)
    assert lines[0].startswith("GPU idle between kernels: 0.0 ms per call in 1 gaps")
    assert "| communication (NCCL) | 0.02 |" in lines


def test_overlap_bench_without_two_gpus_exits_cleanly():
    if torch.cuda.device_count() >= 2:
        return  # on a machine with 2 GPUs the default run is the real benchmark
    r = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_overlap.py")], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "needs 2 or more CUDA GPUs" in r.stderr and "Traceback" not in r.stderr


def test_sync_sites_name_the_code_that_led_to_a_synchronisation():
    # What bench_train_gpu.py reports for one Lightning step: the warning's own frame and the callers outside
    # torch that led to it (here this test's helper), counted per site; other warnings are not counted.
    import warnings

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from gpu_profile import SyncSites

    def loss_logging():
        warnings.warn("called a synchronizing CUDA operation")

    with SyncSites() as sites:
        for _ in range(3):
            loss_logging()
        warnings.warn("something else")
    assert sites.count == 3 and len(sites.where) == 1
    site = next(iter(sites.where))
    assert "(loss_logging)" in site and "tests/test_train_bench.py:" in site
    assert sites.report("one Lightning step").startswith("host-device synchronisations in one Lightning step: 3\n    3 x ")


def test_sync_sites_tell_torch_by_its_package_directory():
    # The device machine's environment lives at /opt/torch/.venv: every path there contains "/torch/", and a
    # substring test dropped Lightning's and this repository's frames from the report (only torch's line left).
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from gpu_profile import _in_torch

    assert _in_torch(torch.__file__) and _in_torch(os.path.join(os.path.dirname(torch.__file__), "cuda", "x.py"))
    assert not _in_torch("/opt/torch/.venv/lib/python3.12/site-packages/lightning/pytorch/loops/loop.py")
    assert not _in_torch(os.path.join(REPO, "visualrwkv", "train", "module.py"))


def _agreed_count_worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from bench_overlap import agreed_count

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        n = agreed_count(52 + rank, torch.device("cpu"))  # each rank's own count from its own timings
        with open(f"{out}.{rank}", "w") as f:
            f.write(str(n))
    finally:
        dist.destroy_process_group()


def test_overlap_bench_ranks_agree_on_the_number_of_all_reduces(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_agreed_count_worker, args=(str(tmp_path / "store"), str(tmp_path / "n")), nprocs=2)
    assert [open(tmp_path / f"n.{r}").read() for r in (0, 1)] == ["53", "53"]


def test_ddp_host_bench_prints_a_row_per_parameter_count():
    r = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_ddp_host.py"), "--params", "20,60",
                        "--reps", "20"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [l.strip("|").split("|") for l in r.stdout.splitlines() if l.startswith("| ") and l[2].isdigit()]
    assert [int(row[0]) for row in rows] == [20, 60]
    assert all(float(row[1]) > 0 and float(row[2]) > 0 for row in rows)
    assert "FutureWarning" not in r.stderr  # DDP built as train builds it: no deprecated keyword
