"""Conversation readers: formats, normalisation, stable sample indices, and every bad-input class."""
import json
import re
from pathlib import Path

import pytest

from stage1_extract.conversations import DataError, load_conversations
from tiny import write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def sg(*turns, **extra):
    """A ShareGPT record from (from, value) pairs."""
    return {"conversations": [{"from": f, "value": v} for f, v in turns], **extra}


GOOD = sg(("human", "hi"), ("gpt", "hello"))


def test_sharegpt_jsonl_roles_lines_and_ids(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps(sg(("system", "be brief"), ("human", "q1"), ("gpt", "a1"), ("user", "q2"),
                               ("chatgpt", "a2"), id="x1")) + "\n\n"   # blank line: not a record
                 + json.dumps(sg(("user", "q"), ("assistant", "a"), ("human", "q3"), ("model", "a3"), id=7)) + "\n")
    convs, stats = load_conversations([str(p)])
    assert [c.line for c in convs] == [1, 3]
    assert [c.sample_index for c in convs] == [0, 1]
    assert [c.id for c in convs] == ["x1", "7"]
    assert convs[0].messages == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"}]
    assert [m["role"] for m in convs[1].messages] == ["user", "assistant", "user", "assistant"]
    assert (stats.samples_read, stats.kept, stats.skipped) == (2, 2, {})


def test_openai_messages_and_top_level_system(tmp_path):
    p = write_jsonl(tmp_path / "o.jsonl", [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                      {"role": "assistant", "content": "A"}]},
        {"system": "top", "conversations": [{"from": "human", "value": "U"}, {"from": "gpt", "value": "A"}]},
    ])
    convs, _ = load_conversations([str(p)])
    assert convs[0].messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                                 {"role": "assistant", "content": "A"}]
    assert convs[1].messages[0] == {"role": "system", "content": "top"}


def test_json_array_with_element_lines(tmp_path):
    p = tmp_path / "arr.json"
    p.write_text('[\n  {"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},\n'
                 '  {"id": "b",\n   "conversations": [{"from": "human", "value": "q2"},\n'
                 '                     {"from": "gpt", "value": "a2"}]}\n]\n')
    convs, _ = load_conversations([str(p)])
    assert [(c.id, c.line, c.sample_index) for c in convs] == [("a", 2, 0), ("b", 3, 1)]
    bad = tmp_path / "bad_arr.json"
    bad.write_text('[\n {"conversations": []},\n {"conversations": [}\n]')
    with pytest.raises(DataError) as e:
        load_conversations([str(bad)], on_error="skip")
    assert str(e.value).startswith(f"{bad}:3: record: broken JSON")


def test_real_sharegpt_array(shared_data):
    convs, stats = load_conversations([str(shared_data / "sharegpt_example" / "dummy_conversation.json")])
    assert stats.samples_read == 500 and len(convs) == 500
    assert convs[0].id == "identity_0" and convs[0].messages[0] == {"role": "user", "content": "Who are you?"}
    assert convs[0].line == 2


def test_indices_stable_across_files_and_skips(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [GOOD, {"oops": 1}, GOOD])
    b = write_jsonl(tmp_path / "b.jsonl", [GOOD, sg(("human", "q"))])
    convs, stats = load_conversations([str(a), str(b)], on_error="skip")
    assert [(Path(c.source).name, c.line, c.sample_index) for c in convs] == [
        ("a.jsonl", 1, 0), ("a.jsonl", 3, 2), ("b.jsonl", 1, 3)]
    assert stats.samples_read == 5 and stats.kept == 3
    assert stats.skipped == {"missing conversations/messages": 1, "no assistant turn": 1}
    assert stats.errors == [f"{a}:2: conversations: missing (expected 'conversations' (ShareGPT) or 'messages' "
                            f"(OpenAI); record keys: oops)",
                            f"{b}:2: conversations: no assistant turn (nothing to train on)"]
    assert set(stats.skipped_index) == {1, 4}
    convs, stats = load_conversations([str(a), str(b)], on_error="skip", max_samples=3)
    assert [c.sample_index for c in convs] == [0, 2] and stats.samples_read == 3


@pytest.mark.parametrize("line, expected", [
    ('{"conversations": [{"from": "human", "value": "hi"}', "record: broken JSON (Expecting ',' delimiter at column"),
    ('[1, 2]', "record: expected a JSON object, got list"),
    ('{"text": "hello"}', "conversations: missing (expected 'conversations' (ShareGPT) or 'messages' (OpenAI); "
                          "record keys: text)"),
    ('{"conversations": "hi"}', "conversations: must be a list of turns, got str"),
    (json.dumps(sg(("human", "hi"), ("bot", "x"))), "conversations[1].from: unknown role 'bot' (expected one of"),
    (json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}]}),
     "conversations[1].value: content must be a string, got int"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}),
     "messages[1].content: content must be a string, got null"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}]}),
     "messages[0].content: content must be a string, got list"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}),
     "messages[1].role: unknown role 'robot'"),
    (json.dumps({"messages": [{"content": "q"}]}), "messages[0].role: missing (each turn needs 'from' or 'role')"),
    ('{"conversations": []}', "conversations: empty conversation (no turns)"),
    (json.dumps(sg(("system", "s"), ("human", "hi"))), "conversations: no assistant turn (nothing to train on)"),
    (json.dumps(sg(("human", "a"), ("human", "b"), ("gpt", "c"))),
     "conversations[1].from: two consecutive 'user' turns (conversations[0] and conversations[1])"),
    (json.dumps(sg(("human", "a"), ("gpt", "b"), ("gpt", "c"))),
     "conversations[2].from: two consecutive 'assistant' turns (conversations[1] and conversations[2])"),
])
def test_bad_records_name_file_line_field(tmp_path, line, expected):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(DataError) as e:
        load_conversations([str(p)])
    assert str(e.value).startswith(f"{p}:3: {expected}"), str(e.value)
    # The same record under on_error=skip: counted, and the good records survive.
    convs, stats = load_conversations([str(p)], on_error="skip")
    assert len(convs) == 2 and stats.num_skipped == 1 and stats.errors[0].startswith(f"{p}:3: {expected}")


def test_missing_empty_and_all_bad_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: data file not found"):
        load_conversations([str(tmp_path / "nope.jsonl")])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl: data file is empty"):
        load_conversations([str(tmp_path / "empty.jsonl")])
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"blank\.jsonl: no records"):
        load_conversations([str(tmp_path / "blank.jsonl")])
    with pytest.raises(DataError, match="no data files given"):
        load_conversations([])
    allbad = write_jsonl(tmp_path / "allbad.jsonl", [{"x": 1}, {"x": 2}])
    with pytest.raises(DataError, match=r"no usable conversations .*2 read, skipped: \{'missing conversations/messages': 2\}"):
        load_conversations([str(allbad)], on_error="skip")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported data file type '.txt'"):
        load_conversations([str(tmp_path / "notes.txt")])


def test_prompt_only_records(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [
        sg(("human", "q1"), ("human", "q2")),          # prompt-only: consecutive user turns are fine
        {"prompt": "just a prompt"},
        sg(("system", "s"), ("human", "q")),
        sg(("human", "q"), ("gpt", "a")),              # a full conversation is fine too
    ])
    convs, _ = load_conversations([str(p)], require_assistant=False)
    assert [len(c.messages) for c in convs] == [2, 1, 2, 2]
    assert convs[1].messages == [{"role": "user", "content": "just a prompt"}]
    mixed = write_jsonl(tmp_path / "m.jsonl", [sg(("human", "q1"), ("human", "q2"), ("gpt", "a"))])
    with pytest.raises(DataError, match=r"m\.jsonl:1: conversations\[1\]\.from: two consecutive 'user' turns"):
        load_conversations([str(mixed)], require_assistant=False)
    with pytest.raises(DataError, match=r"p\.jsonl:1: conversations: no assistant turn"):
        load_conversations([str(p)])


def _words(text: str) -> set[str]:
    return set(re.sub(r"[^\w\s]", " ", text.lower()).split())


def test_demo_prompt_files():
    convs, stats = load_conversations([str(ROOT / "configs" / "demo_prompts.jsonl")], require_assistant=False)
    assert stats.kept == stats.samples_read and len(convs) == 300
    assert all(m["role"] == "user" for c in convs for m in c.messages)
    assert sum(len(c.messages) > 1 for c in convs) >= 8
    assert len({c.id for c in convs}) == len(convs)
    ev, _ = load_conversations([str(ROOT / "configs" / "demo_eval_prompts.jsonl")], require_assistant=False)
    assert 20 <= len(ev) <= 30
    train_prompts = {m["content"] for c in convs for m in c.messages}
    assert not train_prompts & {c.messages[0]["content"] for c in ev}
    # held out in substance too: no eval prompt shares more than 60% of its words with a training one
    jaccard = max(len(_words(a) & _words(b)) / len(_words(a) | _words(b))
                  for a in train_prompts for b in (c.messages[0]["content"] for c in ev))
    assert jaccard <= 0.6


def test_hf_dataset_dir_and_parquet(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": "r0", "conversations": [{"from": "human", "value": "q0"}, {"from": "gpt", "value": "a0"}]},
            {"id": "r1", "conversations": [{"from": "human", "value": "q1"}, {"from": "wizard", "value": "a1"}]},
            {"id": "r2", "conversations": [{"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with pytest.raises(DataError) as e:
        load_conversations([str(tmp_path / "d.parquet")])
    assert str(e.value) == (f"{tmp_path / 'd.parquet'}:row 2: conversations[1].from: unknown role 'wizard' "
                            "(expected one of system, human, user, gpt, assistant, chatgpt, model)")
    convs, stats = load_conversations([str(tmp_path / "d.parquet")], on_error="skip")
    assert [(c.id, c.line, c.sample_index) for c in convs] == [("r0", 1, 0), ("r2", 3, 2)]
    assert stats.skipped == {"unknown role": 1}
    msgs = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(3)]
    datasets.Dataset.from_list(msgs).save_to_disk(str(tmp_path / "hfdir"))
    convs, _ = load_conversations([str(tmp_path / "hfdir")])
    assert [c.messages[1]["content"] for c in convs] == ["a0", "a1", "a2"]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(msgs[:2])}).save_to_disk(str(tmp_path / "hfdict"))
    convs, _ = load_conversations([str(tmp_path / "hfdict")])
    assert len(convs) == 2
    (tmp_path / "notds").mkdir()
    with pytest.raises(DataError, match="not a Hugging Face dataset directory"):
        load_conversations([str(tmp_path / "notds")])
