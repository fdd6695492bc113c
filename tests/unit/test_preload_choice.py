"""Which snapshots a preload chooses: order by tier, hits and recency; prefixes; budgets."""

from kvstore.preload import Budget, Candidate, choose, ranked


def cand(tokens, tier="system", hits=0, accessed=0.0, trimmable=True, nbytes=100):
    return Candidate(bytes(16), list(tokens), tier, hits, accessed, trimmable, nbytes)


def test_a_prefix_of_a_chosen_trimmable_snapshot_is_skipped():
    long, short = cand(range(10)), cand(range(5))
    assert choose([long, short], 5) == [long]
    # not when the longer one cannot be trimmed, nor when the short one comes first
    fixed = cand(range(10), trimmable=False)
    assert choose([fixed, short], 5) == [fixed, short]
    assert choose([short, long], 5) == [short, long]


def test_entry_and_byte_limits():
    a, b, c = cand([1, 2], nbytes=60), cand([3, 4], nbytes=50), cand([5, 6], nbytes=30)
    assert choose([a, b, c], 2) == [a, b]
    assert choose([a, b, c], 5, max_bytes=100) == [a, c]  # b does not fit after a; c does
    assert choose([a, b, c], 5, max_bytes=10) == []


def test_budget_takes_until_full():
    budget = Budget(2, 100)
    assert budget.take(60) and not budget.take(50) and budget.take(40) and not budget.take(0)
    unlimited = Budget(1)
    assert unlimited.take(10 ** 12) and not unlimited.take(1)



def test_ranked_system_first_then_hits_then_recency():
    cands = [cand([1], "user", hits=9), cand([2], "system", hits=0, accessed=1.0),
             cand([3], "system", hits=3), cand([4], "system", hits=0, accessed=5.0), cand([5], "assistant")]
    assert [c.tokens[0] for c in ranked(cands)] == [3, 4, 2, 1, 5]
