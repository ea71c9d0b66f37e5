"""Conversations as prompts (specblock_jax.chat): formatted by the target's chat template exactly as
the template's own text would be, and clear errors for what cannot be formatted or read."""

import copy
import json

import pytest

from specblock_jax import chat, generate, hf, load_target

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def target():
    """The toy target with a chat template of our own (it was trained without one)."""
    toy = load_target(hf.TOY_TARGET_DIR)
    tokenizer = copy.deepcopy(toy.tokenizer)
    tokenizer.chat_template = TEMPLATE
    return toy, type(toy)(toy.config, toy.params, tokenizer, toy.path)


def test_a_conversation_decodes_as_its_template_text(target):
    plain, templated = target
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b):"}]
    text = "<system>Be brief.\n<user>def add(a, b):\n<assistant>"
    assert chat.encode(templated.tokenizer, conversation) == templated.tokenizer.encode(text, add_special_tokens=False)
    ours = generate(templated, [conversation, conversation[1:]], max_new_tokens=6)
    ref = generate(templated, [text, "<user>def add(a, b):\n<assistant>"], max_new_tokens=6)
    assert ours.token_ids == ref.token_ids and ours.texts == ref.texts


def test_chat_without_a_template_is_an_error(target):
    plain, _ = target
    with pytest.raises(ValueError, match="prompt 0: the target's tokenizer has no chat template"):
        generate(plain, [[{"role": "user", "content": "hi"}]], max_new_tokens=4)


@pytest.mark.parametrize("messages, message", [
    ([{"role": "bot", "content": "hi"}], "message 0 must be {'role': one of system, user, assistant"),
    ([{"role": "user", "content": 3}], "message 0 must be"),
    ([{"role": "user", "content": "hi", "name": "x"}], "message 0 must be"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "the last message is the assistant's"),
])
def test_bad_messages_are_errors(target, messages, message):
    with pytest.raises(ValueError, match="prompt 0: " + message.replace("{", r"\{").replace("(", r"\(")):
        generate(target[1], [messages], max_new_tokens=4)


def test_question_files_in_the_mt_bench_layout(tmp_path):
    path = tmp_path / "q.jsonl"
    rows = [{"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Shorter."]},
            {"question_id": 82, "turns": ["Hi?"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert chat.is_question_file(path)
    assert chat.read_questions(path) == [rows[0], {"question_id": 82, "category": "general", "turns": ["Hi?"]}]
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"question_id": 3, "prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"q.jsonl:2: a question needs 'turns'"):
        chat.read_questions(path)
    path.write_text(json.dumps({"question_id": 3, "turns": []}) + "\n")
    with pytest.raises(ValueError, match=r"q.jsonl:1: a question needs 'turns', a non-empty list"):
        chat.read_questions(path)
    path.write_text('{"prompt": "x"}\n')
    assert not chat.is_question_file(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        chat.read_questions(tmp_path / "none.jsonl")
