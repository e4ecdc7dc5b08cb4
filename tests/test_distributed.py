"""Multi-process locating under torchrun (gloo on CPU) and the rank agreement protocol.

``torchrun --nproc_per_node=2 -m jas_prune recipe run`` on the shipped ``builtin:shapes-vit`` (the
worker processes cannot see the ``tiny_builtin`` monkeypatch) must give exactly what one
process gives: the same chunks, masks and metrics (timings aside).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from jas_prune.cli import main
from conftest import assert_same_results, results

RECIPE = """version: 1
data: {images_per_class: 3, batch_size: 64}
attribution: {method: jas, steps: 2}
masks: {topk: 2}
evaluate: {intervention: true}
runtime: {device: cpu, seed: 0}
"""

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_what_one_gives(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", "-m", "jas_prune", "recipe", "run", str(recipe),
                           "--out", str(two)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run directory:") == 1  # rank 0 speaks for the run
    assert "rank 1: locating done" in (two / "run.rank1.log").read_text()
    m = json.loads((two / "metrics.json").read_text())
    for key, images in (("locate", 96), ("locate_test", 48)):  # both partitions are sharded
        assert m[key]["world_size"] == 2 and len(m[key]["seconds_per_rank"]) == 2
        assert m[key]["images_this_run"] == images == m[key]["images"]
        assert m[key]["seconds"] == max(m[key]["seconds_per_rank"])

    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker
    try:
        with pytest.MonkeyPatch.context() as mp:  # no figures: seconds of plotting, not results
            mp.setattr("jas_prune.reporting.write_report", lambda run_dir: Path(run_dir) / "report.md")
            assert main(["recipe", "run", str(recipe), "--out", str(one)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert json.loads((one / "metrics.json").read_text())["locate"]["world_size"] == 1
    assert len(results(one)) == 1 + 3 + 2 + 1  # metrics, 3 probe + 2 test chunks, masks
    assert_same_results(one, two)


RANK_SCRIPT = textwrap.dedent("""
    import sys, torch
    from jas_prune.distributed import PeerFailedError, init_from_env
    from jas_prune.errors import DataError

    d = init_from_env(torch.device("cpu"))
    assert (d.rank, d.world, d.backend) == (int(sys.argv[1]), 2, "gloo")
    with d.stage("sharing") as s:
        s.value = 10 * d.rank
    print("values", s.values)
    try:
        with d.stage("reading images"):
            if d.rank == 1:
                raise DataError("image 7 is unreadable")
    except PeerFailedError as exc:
        print("peer failed", exc.exit_code, exc)
    except DataError:
        print("own error")
    if d.rank == 1:
        sys.exit(0)  # gone without a word
    try:
        with d.stage("waiting for rank 1"):
            pass
    except PeerFailedError as exc:
        print("lost", exc)
    d.close()
""")


def run_two_ranks(tmp_path: Path, script_text: str, *args: str) -> tuple[str, str]:
    """Run ``script_text`` as ranks 0 and 1 of a 2-process group (torchrun's environment, 20 s
    timeout); both must exit 0. Returns their stdout."""
    script = tmp_path / "ranks.py"
    script.write_text(script_text)
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "JAS_PRUNE_DIST_TIMEOUT": "20"}
        procs.append(subprocess.Popen([sys.executable, str(script), str(rank), *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    return outs[0][0], outs[1][0]


def test_a_failing_or_vanished_rank_stops_the_others(tmp_path):
    zero, one = run_two_ranks(tmp_path, RANK_SCRIPT)
    assert "values [0, 10]" in zero and "values [0, 10]" in one
    assert "peer failed 2 rank 1 failed while reading images: image 7 is unreadable" in zero
    assert "own error" in one
    assert "lost rank 0: lost contact with the other ranks while waiting for rank 1" in zero


LEAVE_SCRIPT = textwrap.dedent("""
    import atexit, os, sys, torch
    import torch.distributed as dist
    from jas_prune.distributed import init_from_env

    def gloo_threads():  # gloo's worker and I/O threads (C++ threads, named by torch)
        names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
        return sum(n in ("pt_gloo_runloop", "gloo_tcp_loop") for n in names)

    # registered before init_from_env's hook, so it runs after it (atexit is last in, first out)
    atexit.register(lambda: print("at exit", dist.is_initialized(), gloo_threads(), flush=True))
    d = init_from_env(torch.device("cpu"))
    import torch.distributed.nn.functional as F  # as timm does, once the group exists

    def mine(tensor, group=dist.group.WORLD):  # a default that holds the group itself
        return tensor
    print("held", mine.__defaults__[0] is dist.group.WORLD, F.all_reduce.__defaults__[-1] is dist.group.WORLD)
    with d.stage("sharing") as s:
        s.value = d.rank
    print("values", s.values, "gloo threads", gloo_threads() > 0)
    if d.rank == 1:
        sys.exit(0)  # its part is done: it leaves without close()
    d.close()
    print("closed", dist.is_initialized(), gloo_threads())
""")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names in /proc")
def test_a_rank_never_reaches_interpreter_shutdown_with_its_group_alive(tmp_path):
    """gloo's worker thread may still hold the last agreement's tensors; releasing them during
    interpreter shutdown aborts the process (SIGABRT) now and then: the group must be destroyed,
    its threads joined, before that: by a rank that exits without close(), and even when a
    function's default argument holds the group."""
    zero, one = run_two_ranks(tmp_path, LEAVE_SCRIPT)
    for out in (zero, one):
        assert "held True False" in out, out  # torch.distributed.nn was imported before the group
        assert "values [0, 1] gloo threads True" in out, out
    assert "at exit False 0" in one, one
    assert "closed False 0" in zero, zero  # close() frees the group although `mine` held it


SHARED_SCRIPT = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from jas_prune.distributed import PeerFailedError, init_from_env
    from jas_prune.errors import OutputDirError

    d = init_from_env(torch.device("cpu"))
    shared, own = Path(sys.argv[2]), Path(sys.argv[2] + f"-node{d.rank}")
    d.shared_dir(shared, lambda: shared.mkdir())
    print("shared ok", sorted(p.name for p in shared.iterdir()))
    try:  # as if each rank ran on its own machine, with its own --out
        d.shared_dir(own, lambda: own.mkdir())
    except PeerFailedError as exc:
        print("peer failed", exc.exit_code, exc)
    except OutputDirError as exc:
        print("own error", exc.exit_code, exc)
    d.close()
""")


def test_every_rank_must_see_the_same_out(tmp_path):
    zero, one = run_two_ranks(tmp_path, SHARED_SCRIPT, str(tmp_path / "out"))
    assert "shared ok []" in zero and "shared ok" in one  # rank 0 removes the token once every rank saw it
    expected = f"--out {tmp_path}/out-node1: rank 1 does not see the run directory rank 0 prepared"
    assert f"own error 2 {expected}" in one, one
    assert f"peer failed 2 rank 1 failed while checking that every rank sees --out: {expected}" in zero, zero
    assert "shared file system" in one


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_too_few_gpus_is_a_user_error(monkeypatch):
    from jas_prune.distributed import init_from_env
    from jas_prune.errors import StageNotAvailableError

    n = torch.cuda.device_count()
    monkeypatch.setenv("WORLD_SIZE", str(n + 1))
    monkeypatch.setenv("RANK", str(n))
    monkeypatch.setenv("LOCAL_RANK", str(n))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    with pytest.raises(StageNotAvailableError, match="GPU"):
        init_from_env(torch.device("cuda"))


def test_a_bad_image_on_rank_1_stops_rank_0_within_a_chunk(tmp_path):
    """Rank 1's first chunk holds a truncated PNG: rank 1 fails at once and rank 0, which owns
    chunks 0, 2, ..., 10, stops after the chunk it is on instead of locating its whole share
    (or waiting for the stage timeout) first."""
    import time

    from jas_prune.data import build_source, write_shapes_split

    root = tmp_path / "images"
    write_shapes_split("probe", root, seed=0, images_per_class=10)  # 48 classes x 8 PNGs
    probe = build_source("imagefolder", root=str(root), seed=0, probe_fraction=0.9).subset("probe")
    assert len(probe) == 336  # 11 chunks: 6 on rank 0, 5 on rank 1
    bad = Path(probe[32].ref)  # the first image of chunk 1, rank 1's first
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\ndata: {{kind: imagefolder, root: {root}, probe_fraction: 0.9}}\n"
                      "attribution: {method: jas, steps: 2}\nruntime: {device: cpu, seed: 0}\n")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "JAS_PRUNE_DIST_TIMEOUT": "120"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", "-m", "jas_prune", "recipe", "run", str(recipe),
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    wall = time.monotonic() - t0
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert f"jas-prune: error: data.root: cannot read image {bad}" in proc.stderr  # rank 1's own line
    assert "jas-prune: error: rank 1 failed while locating probe: data.root: cannot read image" in proc.stderr
    chunks = sorted(p.name for p in (out / "paths" / "probe").glob("chunk-*.safetensors"))
    assert len(chunks) <= 2 and "chunk-00001.safetensors" not in chunks, chunks  # not rank 0's 6 chunks
    assert wall < 60, f"{wall:.0f} s"
