"""Request preparation (``cluster.base.requests``) with the real SmolLM2 tokenizer and the tiny test tokenizer:
prompts that yield no token, that UTF-8 cannot encode, that cannot fit the context (refused before tokenizing),
unknown roles, and the lower bound on a text's tokens that refusal rests on."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import normalizers

from radixserve.cluster.base.generation import (ROLES, ChatMessage, GenerationError, GenerationRequest, Prompt,
                                                Status)
from radixserve.cluster.base.requests import ModelLimits, Preparer, prepare
from radixserve.cluster.base.tokenizer import LONG_TEXT_CHARS, Tokenizer
from radixserve.worker.models.checkpoint import Checkpoint
from radixserve.worker.models.loading import open_checkpoint

SMOLLM2_LIMITS = ModelLimits(vocab_size=49152, max_model_len=8192)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_hf_dir: Path) -> Tokenizer:
    return open_checkpoint(tiny_hf_dir).tokenizer


def refusal(prompt: Prompt, tokenizer: Tokenizer, limits: ModelLimits = SMOLLM2_LIMITS) -> GenerationError:
    with pytest.raises(GenerationError) as caught:
        prepare(GenerationRequest(prompt), tokenizer, limits)
    assert caught.value.status == Status.INVALID_ARGUMENT
    return caught.value


@pytest.mark.parametrize("text", ["\x13", "\x04", "\x14", "\x13\x04\x14" * 50])
def test_a_prompt_that_tokenizes_to_nothing_is_invalid_naming_it(smollm2_checkpoint: Checkpoint, text: str) -> None:
    error = refusal(Prompt(text=text), smollm2_checkpoint.tokenizer)
    assert error.field == "prompt" and "empty" in error.message


def test_a_prompt_utf8_cannot_encode_is_invalid_naming_it(smollm2_checkpoint: Checkpoint) -> None:
    assert refusal(Prompt(text="a\ud800b"), smollm2_checkpoint.tokenizer).field == "prompt"
    chat = Prompt(messages=(ChatMessage("user", "x\udfff"),))
    assert refusal(chat, smollm2_checkpoint.tokenizer).field == "messages"


class CountingTokenizer(Tokenizer):
    """The real tokenizer, noting the length of each text it tokenizes and the thread it does it on."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(tokenizer._backend, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, chat_template=tokenizer.chat_template)
        self.encoded: list[tuple[int, int]] = []  # (characters, thread id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        self.encoded.append((len(text), threading.get_ident()))
        return super().encode(text, add_special_tokens)


@pytest.mark.parametrize("prompt", [Prompt(text="word " * 800_000),
                                    Prompt(messages=(ChatMessage("user", "Hi " * 1_300_000),))],
                         ids=["text", "messages"])
def test_a_prompt_too_long_for_the_context_is_refused_before_it_is_tokenized(smollm2_checkpoint: Checkpoint,
                                                                            prompt: Prompt) -> None:
    tokenizer = CountingTokenizer(smollm2_checkpoint.tokenizer)
    error = refusal(prompt, tokenizer)
    assert error.field == ("prompt" if prompt.text else "messages")
    assert "at least" in error.message and "8192" in error.message
    assert tokenizer.encoded == []


def test_a_long_prompt_is_tokenized_off_the_event_loop_a_short_one_on_it(smollm2_checkpoint: Checkpoint) -> None:
    tokenizer = CountingTokenizer(smollm2_checkpoint.tokenizer)
    preparer = Preparer()

    async def main() -> int:
        for text in ("Hello", "word " * (LONG_TEXT_CHARS // 5 + 1)):
            await preparer.prepare(GenerationRequest(Prompt(text=text)), tokenizer, SMOLLM2_LIMITS)
        return threading.get_ident()
    try:
        loop_thread = asyncio.run(main())
    finally:
        preparer.close()
    [(short, short_thread), (long, long_thread)] = tokenizer.encoded
    assert short < LONG_TEXT_CHARS < long
    assert short_thread == loop_thread != long_thread


@pytest.mark.parametrize("role", ["wizard", "", "USER", "System "])
def test_a_role_openai_does_not_know_is_invalid_naming_it(smollm2_checkpoint: Checkpoint, role: str) -> None:
    prompt = Prompt(messages=(ChatMessage("system", "Be terse."), ChatMessage(role, "Hi")))
    assert refusal(prompt, smollm2_checkpoint.tokenizer).field == "messages[1].role"


def test_every_known_role_is_accepted(smollm2_checkpoint: Checkpoint) -> None:
    for role in ROLES:
        prompt = Prompt(messages=(ChatMessage(role, "Hi"),))
        assert prepare(GenerationRequest(prompt), smollm2_checkpoint.tokenizer, SMOLLM2_LIMITS).token_ids


# Texts rich in what shapes tokenization: runs of spaces and newlines (the longest tokens), digits, special
# tokens' text, characters outside the vocabulary, multi-byte characters.
TEXTS = st.lists(st.one_of(st.text(max_size=30), st.sampled_from(
    [" " * 64, "\n" + " " * 80, "\t\t", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "\x13\x04", "0123456789",
     "é", "日本語", "🙂"])), max_size=12).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS)
def test_min_num_tokens_never_exceeds_the_tokens_smollm2_makes(smollm2_checkpoint: Checkpoint, text: str) -> None:
    tokenizer = smollm2_checkpoint.tokenizer
    assert tokenizer.min_num_tokens(text) <= len(tokenizer.encode(text))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS)
def test_min_num_tokens_never_exceeds_the_tokens_the_tiny_tokenizer_makes(tiny_tokenizer: Tokenizer,
                                                                          text: str) -> None:
    assert tiny_tokenizer.min_num_tokens(text) <= len(tiny_tokenizer.encode(text))


def test_min_num_tokens_bounds_long_texts_and_is_zero_for_tokenizers_it_cannot_bound(
        smollm2_checkpoint: Checkpoint) -> None:
    tokenizer = smollm2_checkpoint.tokenizer
    assert tokenizer.min_num_tokens(" " * 81 * 1000) == 1000  # the longest token is 81 spaces after a newline
    assert tokenizer.min_num_tokens("\x13" * 10_000) == 0  # characters the vocabulary lacks yield no token
    backend = Tokenizer.from_json(tokenizer.to_json())._backend
    backend.normalizer = normalizers.Strip()  # a normalizer may drop any amount of text
    assert Tokenizer(backend).min_num_tokens(" " * 100_000) == 0
