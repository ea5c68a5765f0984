from actors.toy_tasks import lowercase_fraction


def test_lowercase_fraction():
    assert lowercase_fraction("the cat Sat on 3 mats") == 4 / 6
    assert lowercase_fraction("") == 0.0
    assert lowercase_fraction("all lower words") == 1.0
