from launcher.up import JsonlTail


def test_jsonl_tail_returns_only_new_complete_rows(tmp_path):
    path = tmp_path / "m.jsonl"
    tail = JsonlTail(path)
    assert tail.new_rows() == []
    path.write_text('{"step": 1}\n{"step": 2}\n{"ste')
    assert tail.new_rows() == [{"step": 1}, {"step": 2}]
    with open(path, "a") as f:
        f.write('p": 3}\n')
    assert tail.new_rows() == [{"step": 3}]
    assert tail.new_rows() == []
