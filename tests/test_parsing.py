import pytest

from stages.backends.parsing import classify, is_echo, select_rationale, split_thinking


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>look at the dog</think>It is a dog.", ("look at the dog", "It is a dog.")),
        ("  <think>\n a \n</think>\n\n b \n", ("a", "b")),
        # cut off while thinking: everything after the tag is thinking, no answer
        ("<think>step one, step two", ("step one, step two", "")),
        # Qwen3 style: the chat template opened <think>, the model only closes it
        ("step one\n</think>\nthe answer", ("step one", "the answer")),
        # no thinking at all
        ("  just an answer ", (None, "just an answer")),
        # an empty thinking block (thinking switched off) is not "no block"
        ("<think>\n\n</think>\n\nanswer", ("", "answer")),
        # text before the block belongs to the answer
        ("Sure. <think>why</think> Because.", ("why", "Sure.  Because.")),
        ("", (None, "")),
    ],
)
def test_split_thinking(text, expected):
    assert split_thinking(text) == expected


def test_split_thinking_other_tags_first_pair_found_wins():
    tags = (("<reasoning>", "</reasoning>"), ("<think>", "</think>"))
    assert split_thinking("<think>a</think>b", tags) == ("a", "b")
    assert split_thinking("<reasoning>x</reasoning>y", tags) == ("x", "y")
    # the default tags do not know <reasoning>
    assert split_thinking("<reasoning>x</reasoning>y") == (None, "<reasoning>x</reasoning>y")


def test_select_rationale():
    text = "<think>the query asks for a red car</think>A red car."
    assert select_rationale(text, "thinking") == "the query asks for a red car"
    assert select_rationale(text, "answer") == "A red car."
    assert select_rationale(text, "both") == "the query asks for a red car\n\nA red car."
    # no thinking block: "thinking" falls back to the whole answer; "both" has no empty part
    assert select_rationale("plain reasoning", "thinking") == "plain reasoning"
    assert select_rationale("plain reasoning", "both") == "plain reasoning"
    assert select_rationale("<think></think>ans", "thinking") == "ans"
    # cut off while thinking: the answer is empty
    assert select_rationale("<think>half a thought", "answer") == ""
    assert select_rationale("<think>half a thought", "both") == "half a thought"
    with pytest.raises(ValueError, match="thinking, answer, both"):
        select_rationale(text, "all")


PROMPT = (
    "Think step by step about what this query is looking for, then write a short rationale.\n"
    "Query: <|image_1|> Find a picture of a golden retriever playing in the snow."
)


def test_classify_order_and_labels():
    assert classify("anything", "error", PROMPT) == "error"
    assert classify("a long text that was cut", "length", PROMPT) == "length"
    assert classify("", "length", PROMPT) == "length"  # cut off wins over empty
    assert classify(" \n\t ", "stop", PROMPT) == "empty"
    assert classify("The dog is a golden retriever, so snow scenes with one match.", "stop", PROMPT) == "stop"
    # a server's own reason is kept
    assert classify("fine text here", "content_filter", PROMPT) == "content_filter"


def test_classify_echo():
    # the query line repeated back, with different case, spacing and punctuation
    assert classify("query: find a picture of a GOLDEN retriever playing in the snow", "stop", PROMPT) == "echo"
    # the whole prompt echoed, plus a chat-template role word (1 extra word of ~30)
    assert classify("user " + PROMPT, "stop", PROMPT) == "echo"
    # copying the prompt then adding real content is not an echo
    text = "Find a picture of a golden retriever. The key cues are a golden coat, snow and play."
    assert classify(text, "stop", PROMPT) == "stop"


def test_is_echo_thresholds():
    prompt = "one two three four five six seven eight nine ten"
    assert is_echo("one two three four five six seven eight nine ten", prompt)
    assert is_echo("one two three four five six seven eight nine zzz", prompt)  # 9 of 10 words
    assert not is_echo("one two three four five six seven eight zzz yyy", prompt)  # 8 of 10
    # words must be contiguous in the prompt
    assert not is_echo("ten nine eight seven six", prompt)
    # too short to call
    assert not is_echo("two three", prompt)
    assert is_echo("two three", prompt, min_words=2)


def test_is_echo_long_prompt_is_fast():
    import time

    prompt = " ".join(f"w{i % 500}" for i in range(20000))
    text = " ".join(f"x{i}" for i in range(300))
    start = time.perf_counter()
    assert not is_echo(text, prompt)
    assert is_echo(" ".join(f"w{i % 500}" for i in range(10, 310)), prompt)
    assert time.perf_counter() - start < 2.0
