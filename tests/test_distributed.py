"""Synchronized normalization on torch.distributed (gloo), with real processes.

Two and four processes on this machine (loopback) stand in for several machines; each runs every
case of tests/distributed_workers.py and compares its share with one process computing the
concatenated batch (torch.nn's batch norm in float64, or a plain-ops forward of a user spec).
"""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
import distributed_workers as workers  # noqa: E402
from symbn.torch.bench import spawn_world  # noqa: E402

TOLERANCE = {"float64": 1e-12, "float32": 1e-5}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}-processes")
def results(request, tmp_path_factory):
    """Every case's results, per process: {case: [rank 0's, rank 1's, ...]}."""
    world = request.param
    folders = []

    def arguments():  # a fresh folder per try (a world aborting at exit, upstream, runs again once)
        folders.append(tmp_path_factory.mktemp(f"world{world}"))
        return world, str(folders[-1])

    spawn_world(workers.main, arguments, world)
    folder = folders[-1]
    out = {}
    for case in workers.CASES:
        out[case] = [json.loads((folder / f"{case}-{rank}.json").read_text()) for rank in range(world)]
    return out


def _ok(per_rank: list[dict]) -> list[dict]:
    for rank, result in enumerate(per_rank):
        assert "error" not in result, f"process {rank}: {result.get('error')}\n{result.get('traceback', '')}"
    return per_rank


def _within(result: dict, tolerance: float) -> None:
    for key, error in result.items():
        assert error <= tolerance, f"{key}: relative error {error:.3g} > {tolerance:g}"


def test_batch_norm_matches_one_process_on_the_concatenated_batch(results):
    for result in _ok(results["float64"]):
        _within(result, TOLERANCE["float64"])


def test_float32_within_1e_5_also_on_a_large_offset(results):
    for result in _ok(results["float32"]):
        _within(result["unit"], TOLERANCE["float32"])
        _within(result["offset"], TOLERANCE["float32"])


def test_an_empty_process_and_one_element_per_process(results):
    for result in _ok(results["edges"]):
        _within(result["empty"], TOLERANCE["float64"])
        _within(result["single"], TOLERANCE["float64"])


def test_a_user_spec_synchronized(results):
    for result in _ok(results["spec"]):
        _within(result, TOLERANCE["float64"])


def test_one_collective_in_the_forward_and_one_in_the_backward(results):
    for result in _ok(results["collectives"]):
        assert result == {"forward": ["all_gather"], "backward": ["all_reduce"]}


def test_ddp_ten_steps_match_single_process_training(results):
    for result in _ok(results["ddp"]):
        assert result["converted"] == 2
        assert result["worst"] <= 1e-9, result


def test_bad_input_is_an_error_on_every_process(results):
    for rank, found in enumerate(_ok(results["bad"])):
        assert "layer differs across processes" in found["channels"], (rank, found)
        assert "different dtypes" in found["dtypes"] and "float32" in found["dtypes"], (rank, found)
        assert "channels differ" in found["input"], (rank, found)


def test_training_without_a_process_group_is_a_clear_error():
    from symbn.torch import SyncBatchNorm

    layer = SyncBatchNorm(3)
    with pytest.raises(RuntimeError, match=r"torch\.distributed is not initialized"):
        layer(torch.randn(4, 3))
    layer.eval()
    assert layer(torch.randn(4, 3)).shape == (4, 3)  # eval mode needs no process group


def test_the_readme_example_runs_under_torchrun(tmp_path):
    """README's "Several machines" command, on one machine: two processes."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",  # a free port of its own
               str(root / "examples" / "sync_train.py")]
    for _ in range(2):
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        # DDP imports torch._dynamo, and with it a gloo process now and then aborts at exit, after
        # its work ("terminate called without an active exception", upstream: pytorch#179291, about
        # one run in 30 here): that one failure is run again, once; any other fails at once
        if not (done.returncode and "terminate called without an active exception" in done.stderr
                and "step 10: loss" in done.stdout):
            break
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes, step 10: loss" in done.stdout



def test_a_second_derivative_through_the_sync_layer_is_an_error(results):
    for found in _ok(results["second_order"]):
        assert "once_differentiable" in found["error_message"], found
