"""Conversation rendering: exact ids and loss masks on hand-written conversations."""

from __future__ import annotations

import pytest
from nanorun.trainer.chat.conversation import ConversationError, render_conversation, render_for_completion

from tests.tasks.byte_tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def S(name: str) -> list[int]:
    return [TOK.encode_special(f"<|{name}|>")]


def T(text: str) -> list[int]:
    return TOK.encode(text)


def test_user_turns_are_masked_and_assistant_text_and_end_are_trained():
    ids, mask = render_conversation(
        TOK,
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "ok?"},
                {"role": "assistant", "content": "k"},
            ]
        },
    )
    assert ids == (
        S("bos")
        + S("user_start")
        + T("hi")
        + S("user_end")
        + S("assistant_start")
        + T("yo")
        + S("assistant_end")
        + S("user_start")
        + T("ok?")
        + S("user_end")
        + S("assistant_start")
        + T("k")
        + S("assistant_end")
    )
    assert mask == [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1]


def test_tool_calls_are_trained_and_tool_outputs_are_not():
    conversation = {
        "messages": [
            {"role": "user", "content": "2+2"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "ok "},
                    {"type": "python", "text": "2+2"},
                    {"type": "python_output", "text": "4"},
                    {"type": "text", "text": " #4"},
                ],
            },
        ]
    }
    ids, mask = render_conversation(TOK, conversation)
    expected = [
        (S("bos"), 0),
        (S("user_start"), 0),
        (T("2+2"), 0),
        (S("user_end"), 0),
        (S("assistant_start"), 0),
        (T("ok "), 1),
        (S("python_start"), 1),
        (T("2+2"), 1),
        (S("python_end"), 1),
        (S("output_start"), 0),
        (T("4"), 0),
        (S("output_end"), 0),
        (T(" #4"), 1),
        (S("assistant_end"), 1),
    ]
    assert ids == [t for tokens, _ in expected for t in tokens]
    assert mask == [m for tokens, m in expected for _ in tokens]


def test_system_message_is_folded_into_the_first_user_turn():
    with_system = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ]
    }
    folded = {
        "messages": [
            {"role": "user", "content": "Be brief.\n\nHi"},
            {"role": "assistant", "content": "Hello"},
        ]
    }
    assert render_conversation(TOK, with_system) == render_conversation(TOK, folded)
    assert with_system["messages"][0]["role"] == "system"  # the input is not modified


def test_long_conversation_is_cut_after_the_last_assistant_turn_that_fits():
    turn = [{"role": "user", "content": "aaaa"}, {"role": "assistant", "content": "bbbb"}]
    ids_one, _ = render_conversation(TOK, {"messages": turn})
    ids, mask = render_conversation(TOK, {"messages": turn * 3}, max_tokens=len(ids_one) + 5)
    assert ids == ids_one  # the second exchange would not fit whole: it is dropped, not half-kept
    assert ids[-1] == S("assistant_end")[0] and len(mask) == len(ids)


def test_first_turn_longer_than_the_limit_is_truncated_to_the_limit():
    ids, mask = render_conversation(
        TOK,
        {"messages": [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "y"}]},
        max_tokens=20,
    )
    assert len(ids) == len(mask) == 20 and sum(mask) == 0


def test_completion_prompt_matches_the_training_rendering_up_to_the_reply():
    conversation = {
        "messages": [
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"},
        ]
    }
    train_ids, _ = render_conversation(TOK, conversation)
    prompt = render_for_completion(TOK, conversation)
    assert prompt[-1] == S("assistant_start")[0]
    assert train_ids[: len(prompt)] == prompt  # train/serve parity
    # a history that ends with the user's message (what serving sends) gives the same prompt
    assert render_for_completion(TOK, {"messages": conversation["messages"][:3]}) == prompt


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "at least one message"),
        ([{"role": "assistant", "content": "hi"}], "expected role 'user'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "expected role 'assistant'"),
        ([{"role": "system", "content": "s"}], "followed by a user message"),
        ([{"role": "user", "content": 3}], "user content must be"),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": [{"type": "image", "text": ""}]},
            ],
            "each assistant part",
        ),
    ],
)
def test_malformed_conversations_are_rejected_with_a_clear_error(messages, message):
    with pytest.raises(ConversationError, match=message):
        render_conversation(TOK, {"messages": messages})


def test_openai_style_text_parts_in_user_content_are_accepted():
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "y"}]}
        ]
    }
    assert render_for_completion(TOK, parts) == render_for_completion(
        TOK, {"messages": [{"role": "user", "content": "hey"}]}
    )
