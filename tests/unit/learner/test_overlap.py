"""learner/overlap.py and learner/group.py collectives on 2 real gloo ranks (spawned processes)."""

from __future__ import annotations

import pytest
import torch
from overlap_worker import (
    algorithms_in_step,
    group_collectives,
    nccl_overlap,
    overlap_vs_sequential,
    population_in_step,
)

from canopy.cluster.bench.learner import spawn_ranks
from canopy.learner.overlap import OverlapTrainer, allreduce_grads, buckets


@pytest.mark.parametrize("bucket_mb", [25.0, 0.05], ids=["one-bucket-per-model", "many-buckets"])
def test_overlapped_all_reduce_gives_bit_for_bit_the_sequential_result_on_every_rank(
    bucket_mb: float,
) -> None:
    results = spawn_ranks(overlap_vs_sequential, 2, bucket_mb, timeout_s=60)
    for rank, r in enumerate(results):
        assert r["bitwise_equal"], f"rank {rank}: overlapped and sequential parameters differ"
        assert r["ranks_equal"], f"rank {rank}: the ranks' parameters differ"
        assert r["moved"] > 0, "no update happened"
        # Averaged gradients equal one big batch's gradient, up to float summation order.
        assert r["max_abs_diff_to_reference"] < 1e-5, r


def test_group_control_flags_broadcast_and_gather_reach_every_rank() -> None:
    results = spawn_ranks(group_collectives, 2, timeout_s=60)
    for r in results:
        assert r["halt"] is True and r["ckpt"] is True  # rank 1 stops: both stop; rank 0 checkpoints
        assert r["calm"] == [False, False]  # a follower cannot ask for a checkpoint
        assert r["broadcast"] == 999
        assert r["parts"] == ["rank 0 ", "rank 1 rank 1 "]
        assert r["empty"] == ""


def test_dqn_and_td3_ranks_with_the_grad_sync_hook_stay_identical_on_different_batches() -> None:
    a, b = spawn_ranks(algorithms_in_step, 2, timeout_s=60)
    assert a["updates"] == b["updates"] == 5
    assert a["dqn"] == b["dqn"] and a["td3"] == b["td3"]


def test_a_dqn_population_in_a_group_overlaps_its_models_and_the_ranks_stay_identical() -> None:
    a, b = spawn_ranks(population_in_step, 2, timeout_s=60)
    assert a["updates"] == b["updates"] == 5
    assert a["moved"] and a["digest"] == b["digest"], "the ranks' populations diverged"


def test_buckets_split_by_size_and_skip_missing_gradients() -> None:
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (10, 10, 10, 300)]
    for p in params[:3] + params[3:]:
        p.grad = torch.ones_like(p)
    params[1].grad = None
    out = buckets(params, bucket_bytes=80)
    assert [[g.numel() for g in b] for b in out] == [[10, 10], [300]]


def test_without_a_process_group_gradients_are_left_alone_and_one_trainer_still_steps() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    allreduce_grads([p]).wait()
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    with pytest.raises(ValueError, match="at least one model"):
        OverlapTrainer([])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_nccl_path_overlaps_bit_for_bit_and_moves_control_messages_on_the_gpu() -> None:
    world = min(2, torch.cuda.device_count())  # NCCL: one GPU per rank
    results = spawn_ranks(nccl_overlap, world, timeout_s=120, backend="nccl")
    for r in results:
        assert r["bitwise_equal"]
        assert r["flags"] == [False, True]
        assert r["broadcast"] == "nccl"
        assert r["parts"] == [[i] * 3 for i in range(world)]
