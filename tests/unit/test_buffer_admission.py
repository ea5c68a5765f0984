"""Admission permits (hand-worked against the formula in buffer/admission.py) and the buffer's messages."""

from buffer.admission import permits
from protocol.codec import decode, encode
from protocol.messages import PromptGrant, PromptLease, PromptRequest
from tests.factories import same


def grant(**kw) -> int:
    base = dict(unconsumed=1, leased=1, learner_version=5, actor_version=5, trees_per_step=2, max_staleness=1, cap=100)
    return permits(**{**base, **kw})


def test_permits_fill_the_staleness_window():
    # window = B*(S+1-lag) = 2*(1+1-0) = 4 trees; 1 unconsumed + 1 leased are already in it
    assert grant() == 2
    assert grant(max_staleness=3) == 2 * 4 - 2
    assert grant(unconsumed=0, leased=0, max_staleness=0) == 2  # S=0: one batch at a time (synchronous)


def test_permits_shrink_with_actor_lag_and_never_go_negative():
    assert grant(actor_version=4) == 0  # lag 1: window 2*(1+1-1) = 2, all taken
    assert grant(actor_version=2) == 0  # lag 3: window negative, clamped
    assert grant(actor_version=-1) == 2  # unknown version: lag 0
    assert grant(actor_version=7) == 2  # an actor ahead of the learner has no lag


def test_permits_respect_the_unconsumed_cap():
    assert grant(cap=3) == 1
    assert grant(cap=2) == 0


def test_prompt_messages_round_trip():
    req = PromptRequest(actor_id="a0", n=3, policy_version=7)
    g = PromptGrant(leases=[PromptLease(tree_id="p1@1", prompt_id="p1", prompt="1+1?", answer="2", lease_seconds=9.5)],
                    learner_version=4, reason="no_permit", retry_after_s=0.2)
    assert same(decode(encode(req)), req)
    assert same(decode(encode(g)), g)
    assert same(decode(encode(PromptGrant())), PromptGrant())
