"""The learner's relay tree: slots nearest the learner first, at most `fanout` children per node, orphans placed
again with their subtrees, leaves that refuse to relay, a relay to avoid."""

from learner.relay_tree import LEARNER, RelayTree


def test_seven_actors_with_fanout_two_make_a_tree_of_depth_three():
    tree = RelayTree(fanout=2)
    parents = {k: tree.place(k, relays=True) for k in "abcdefg"}
    assert parents == {"a": LEARNER, "b": LEARNER, "c": "a", "d": "b", "e": "a", "f": "b", "g": "c"}
    assert [tree.depth(k) for k in "abcdefg"] == [1, 1, 2, 2, 2, 2, 3]
    assert tree.overflow == 0


def test_a_leaving_relay_leaves_its_children_to_be_placed_again_with_their_subtrees():
    tree = RelayTree(fanout=2)
    for k in "abcdefg":
        tree.place(k, relays=True)
    orphans = tree.remove("a")  # fed c (which feeds g) and e
    assert orphans == ["c", "e"]
    assert tree.place("c", relays=True) is LEARNER  # a's slot at the learner is free
    assert tree.place("e", relays=True) == "c"  # c now has depth 1 and one child (g)
    assert tree.parent("g") == "c" and tree.depth("g") == 2
    assert tree.subtree("c") == {"c", "g", "e"}


def test_an_actor_is_never_placed_inside_its_own_subtree_nor_under_an_avoided_relay():
    tree = RelayTree(fanout=1)
    for k in "abc":
        tree.place(k, relays=True)  # a <- b <- c
    assert tree.place("b", relays=True, avoid=["a"]) is LEARNER  # a is avoided, c is b's own child
    assert tree.overflow == 1 and tree.direct == {"a", "b"}


def test_leaves_that_do_not_relay_are_never_parents_and_overflow_is_counted():
    tree = RelayTree(fanout=1)
    assert tree.place("a", relays=False) is LEARNER
    assert tree.place("b", relays=False) is LEARNER  # no relay slot anywhere: the learner feeds it too
    assert tree.place("c", relays=True) is LEARNER
    assert tree.place("d", relays=False) == "c"
    assert tree.overflow == 2


def test_actors_fed_beyond_fanout_move_under_a_relay_once_it_has_a_slot():
    tree = RelayTree(fanout=1)
    assert tree.place("a", relays=True) is LEARNER
    assert tree.place("b", relays=False) == "a"
    assert tree.place("c", relays=False) is LEARNER  # a is full, b does not relay: overflow
    assert tree.place("d", relays=True) is LEARNER  # overflow too: the only free relay slot would be its own
    assert tree.rebalance() == [("c", "d")]  # d has slots now; d itself cannot move under a full tree
    assert tree.direct == {"a", "d"} and tree.overflow == 2
    tree.remove("b")  # a has a slot again: the learner's extra actor moves under it
    assert tree.rebalance() == [("d", "a")] and tree.direct == {"a"} and tree.subtree("a") == {"a", "d", "c"}
