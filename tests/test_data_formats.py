"""Format detection (with evidence), column mapping and conversion to conversations."""

import pytest

from ftmagic.data.formats import conversation_issues, detect_format, to_conversation
from ftmagic.data.problems import RecordError
from ftmagic.errors import DataError


def test_detect_alpaca_with_evidence():
    d = detect_format([{"instruction": "a", "input": "", "output": "b"}] * 3)
    assert d.format == "alpaca"
    assert d.evidence == "`instruction` and `output` in 3 of 3 sampled records"


def test_detect_sharegpt():
    rec = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    d = detect_format([rec])
    assert d.format == "sharegpt"
    assert d.evidence == "`conversations` holds a list of {from, value} in 1 of 1 sampled records"
    assert to_conversation(rec, d.format) == [
        {"role": "user", "content": "hi", "weight": 1}, {"role": "assistant", "content": "yo", "weight": 1}]


def test_detect_messages_with_system_and_weights():
    rec = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a", "weight": 0}, {"role": "user", "content": "q2"},
                        {"role": "assistant", "content": "a2"}]}
    d = detect_format([rec])
    assert d.format == "messages"
    assert [t["weight"] for t in to_conversation(rec, "messages")] == [1, 1, 0, 1, 1]


def test_detect_prompt_completion_and_text():
    assert detect_format([{"prompt": "p", "completion": "c"}]).format == "prompt_completion"
    d = detect_format([{"text": "hello"}, {"text": "world"}])
    assert (d.format, d.evidence) == ("text", "`text` in 2 of 2 sampled records")
    assert to_conversation({"text": "hello"}, "text") == [{"role": "text", "content": "hello", "weight": 1}]


def test_majority_wins_and_mentions_others():
    recs = [{"prompt": "p", "completion": "c"}] * 3 + [{"text": "t"}]
    d = detect_format(recs)
    assert d.format == "prompt_completion"
    assert d.evidence.endswith("(also matched: text 1)")


def test_columns_mapping_overrides_detection():
    recs = [{"question": "2+2", "answer": "4", "text": "noise"}]
    d = detect_format(recs, columns={"prompt": "question", "completion": "answer"})
    assert d.format == "prompt_completion"
    assert d.evidence == "the `columns` mapping names prompt=question, completion=answer"
    assert to_conversation(recs[0], d.format, d.columns)[1] == {"role": "assistant", "content": "4", "weight": 1}


def test_unknown_fields_error_lists_keys():
    with pytest.raises(DataError) as err:
        detect_format([{"q": 1, "a": 2}], source="x.jsonl")
    assert str(err.value).startswith("x.jsonl: cannot tell the format from the fields (a, q)")


def test_explicit_format_without_fields():
    with pytest.raises(DataError, match=r"^data: .*`instruction`"):
        detect_format([{"text": "t"}], fmt="alpaca")


def test_explicit_format_without_fields_suggests_a_mapping_of_its_own_fields():
    # `format: text` on alpaca records suggested `{instruction: question, output: answer}`, an alpaca mapping.
    alpaca = [{"instruction": "q", "output": "a"}]
    with pytest.raises(DataError) as err:
        detect_format(alpaca, fmt="text", source="d.jsonl")
    assert str(err.value) == ("d.jsonl: `format: text` needs `text` but no sampled record has them (fields: instruction, "
                              "output); they fit `format: alpaca` (or `auto`); or map your columns with `columns`, "
                              "e.g. {text: COLUMN}")
    with pytest.raises(DataError, match=r"; map your columns with `columns`, e.g. \{prompt: q, completion: a\}$"):
        detect_format([{"q": "2+2", "a": "4"}], fmt="prompt_completion")


def test_unknown_column_name_in_mapping():
    with pytest.raises(DataError, match="columns: `question` is not a field"):
        detect_format([{"text": "t"}], columns={"question": "q"})


def test_alpaca_input_joined_and_system_field():
    conv = to_conversation({"instruction": "Sum", "input": "1 2", "output": "3", "system": "S"}, "alpaca")
    assert conv == [{"role": "system", "content": "S", "weight": 1}, {"role": "user", "content": "Sum\n\n1 2", "weight": 1},
                    {"role": "assistant", "content": "3", "weight": 1}]


def test_system_prompt_only_when_missing():
    conv = to_conversation({"prompt": "p", "completion": "c"}, "prompt_completion", system_prompt="Be brief.")
    assert conv[0] == {"role": "system", "content": "Be brief.", "weight": 1}
    rec = {"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert to_conversation(rec, "messages", system_prompt="Be brief.")[0]["content"] == "own"


@pytest.mark.parametrize("record, fmt, kind, message", [
    ({"instruction": "i"}, "alpaca", "missing_field", "field `output` is missing"),
    ({"text": None}, "text", "missing_field", "field `text` is null"),
    ({"instruction": "i", "output": "  "}, "alpaca", "empty_field", "field `output` is empty"),
    ({"prompt": ["x"], "completion": "c"}, "prompt_completion", "bad_type", "`prompt[0]` is a str, expected {role, content}"),
    ({"messages": "nope"}, "messages", "bad_type", "field `messages` is text that is not a JSON list of messages"),
    ({"messages": []}, "messages", "empty_field", "field `messages` is an empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages", "bad_type", "`messages[0]` has role `robot`; use system, user or assistant"),
    ({"messages": [{"role": "user", "content": "x"}]}, "messages", "no_assistant", "the conversation has no assistant turn to train on"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]}, "messages",
     "bad_type", "`messages[1].weight` is 2; use 0 (not trained) or 1"),
    ({"text": 3.5j}, "text", "bad_type", "field `text` is a complex, expected text"),
])
def test_record_errors(record, fmt, kind, message):
    with pytest.raises(RecordError) as err:
        to_conversation(record, fmt)
    assert (err.value.kind, err.value.message) == (kind, message)


def test_messages_as_json_text_from_csv():
    rec = {"messages": '[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]'}
    assert [t["role"] for t in to_conversation(rec, "messages")] == ["user", "assistant"]


def test_conversation_issues():
    turn = lambda role: {"role": role, "content": "x", "weight": 1}  # noqa: E731
    assert conversation_issues([turn("user"), turn("assistant")]) == []
    assert conversation_issues([turn("user"), turn("user"), turn("assistant")]) == [
        ("role_order", "turns 1 and 2 are both `user`; user and assistant should alternate")]
    assert conversation_issues([turn("user"), turn("assistant"), turn("user")]) == [
        ("no_final_assistant", "the last turn is `user`, not `assistant`; it is not trained")]
    assert conversation_issues([turn("user"), turn("system"), turn("assistant")])[0][0] == "role_order"


def test_a_columns_entry_naming_a_column_no_record_has_is_named():
    """A typo in `columns` read as "cannot tell the format ... set `columns`" (it was set), and a
    mapping onto another format's file was ignored."""
    qa = [{"question": "q", "answer": "a"}]
    with pytest.raises(DataError) as info:
        detect_format(qa, columns={"prompt": "quest", "completion": "answer"}, source="qa.jsonl")
    assert str(info.value) == ("qa.jsonl: `columns` maps `prompt` to `quest`, a column no record has; the records "
                               "have answer, question; did you mean `question`?")
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    with pytest.raises(DataError, match="maps `prompt` to `question`, a column no record has; the records have messages$"):
        detect_format(chat, columns={"prompt": "question"}, source="chat.jsonl")
    assert detect_format(chat, columns={"role": "from", "content": "value"}).format == "messages"  # keys in messages


def test_a_mapped_column_that_only_later_records_have_is_accepted():
    from ftmagic.data.formats import SAMPLE

    records = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(SAMPLE + 5)]
    records[-1]["context"] = "only here"
    detection = detect_format(records, columns={"prompt": "question", "completion": "answer", "system": "context"})
    assert detection.format == "prompt_completion"
