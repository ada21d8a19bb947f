"""The rank arithmetic of nftune.parallel, by hand (the collectives are tested with two ranks in
test_distributed.py)."""

from nftune.parallel import SINGLE, World, interleaved_ids


def test_each_rank_takes_a_contiguous_share_and_the_shares_make_the_whole():
    shares = [World(rank=r, size=3).share(7) for r in range(3)]
    assert shares == [range(0, 3), range(3, 5), range(5, 7)]
    assert SINGLE.share(4) == range(4)
    assert World(rank=1, size=2).share(1) == range(1, 1)  # fewer items than ranks


def test_questions_are_dealt_round_robin_so_mini_batches_span_the_ranks():
    # rank 0 holds 3 questions, rank 1 one, rank 2 two: dealt 0a 1a 2a 0b 2b 0c
    assert [interleaved_ids([3, 1, 2], r) for r in range(3)] == [[0, 3, 5], [1], [2, 4]]
    assert interleaved_ids([0, 2], 0) == [] and interleaved_ids([0, 2], 1) == [0, 1]
    every = sorted(i for r in range(2) for i in interleaved_ids([4, 4], r))
    assert every == list(range(8))


def test_one_process_reduces_to_itself():
    assert SINGLE.sum(1, 2.5) == [1.0, 2.5] and SINGLE.max(3) == [3.0]
    assert SINGLE.gather("x") == ["x"] and not SINGLE.distributed and SINGLE.is_main
