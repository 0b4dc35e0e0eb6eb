from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as Backend

from radixserve.worker.models.checkpoint import Checkpoint
from radixserve.worker.models.loading import open_checkpoint
from radixserve.cluster.base.tokenizer import IncrementalDetokenizer, Tokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_hf_dir: Path) -> Tokenizer:
    return open_checkpoint(tiny_hf_dir).tokenizer


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_checkpoint: Checkpoint) -> Tokenizer:
    return smollm2_checkpoint.tokenizer


def stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    """Every delta of an incremental detokenization of ``ids``, ``finish()``'s last."""
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    pieces = [detokenizer.push(i) for i in ids] + [detokenizer.finish()]
    assert detokenizer.text == "".join(pieces)
    return pieces


def test_properties(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == 320
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2
    assert tokenizer.all_special_ids == (0, 1, 2)


def test_special_tokens_in_text_are_single_ids(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.decode(ids) == "user\nHi"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|>"


def test_encode_rejects_non_text(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="text"):
        tokenizer.encode(b"bytes")  # type: ignore[arg-type]


def test_special_ids_must_be_in_vocabulary(tiny_hf_dir: Path) -> None:
    backend = Backend.from_file(str(tiny_hf_dir / "tokenizer.json"))
    with pytest.raises(ValueError, match="eos_token_id"):
        Tokenizer(backend, eos_token_id=10_000)


def test_chat_template_renders_chatml(tokenizer: Tokenizer) -> None:
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert tokenizer.apply_chat_template(CHAT, add_generation_prompt=False) == expected
    assert tokenizer.apply_chat_template(CHAT) == expected + "<|im_start|>assistant\n"


@pytest.mark.parametrize("messages", [[], "Hi", ["Hi"], [{"role": "user"}], [{"content": "Hi"}],
                                      [{"role": "user", "content": 1}]])
def test_chat_template_rejects_malformed_messages(tokenizer: Tokenizer, messages: object) -> None:
    with pytest.raises(ValueError, match="messages"):
        tokenizer.apply_chat_template(messages)  # type: ignore[arg-type]


def test_chat_template_missing_or_raising(tiny_hf_dir: Path) -> None:
    backend = Backend.from_file(str(tiny_hf_dir / "tokenizer.json"))
    with pytest.raises(ValueError, match="messages.*no chat template"):
        Tokenizer(backend).apply_chat_template(CHAT)
    strict = Tokenizer(backend, chat_template="{{ raise_exception('no system messages') }}")
    with pytest.raises(ValueError, match="messages.*no system messages"):
        strict.apply_chat_template(CHAT)


def test_chat_template_is_sandboxed(tiny_hf_dir: Path) -> None:
    backend = Backend.from_file(str(tiny_hf_dir / "tokenizer.json"))
    escape = Tokenizer(backend, chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ValueError, match="messages"):
        escape.apply_chat_template(CHAT)


def test_split_character_is_held_back_until_complete(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("a𝄞b")
    assert len(ids) == 6  # "𝄞" is four byte tokens in the tiny vocabulary
    assert stream(tokenizer, ids) == ["a", "", "", "", "𝄞", "b", ""]


def test_finish_releases_an_unfinished_character(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("x𝄞")[:-1]
    assert stream(tokenizer, ids) == ["x", "", "", "", "\ufffd"]
    assert tokenizer.decode(ids) == "x\ufffd"


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, 319), max_size=40), skip_special_tokens=st.booleans())
def test_stream_equals_decode_for_any_ids(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool) -> None:
    pieces = stream(tokenizer, ids, skip_special_tokens)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\ufffd"), max_size=40))
def test_stream_of_valid_text_never_emits_replacement_chars(tokenizer: Tokenizer, text: str) -> None:
    pieces = stream(tokenizer, tokenizer.encode(text))
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_smollm2_tokenizer(smollm2_tokenizer: Tokenizer) -> None:
    tok = smollm2_tokenizer
    assert tok.vocab_size == 49152 and tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("<|im_end|>") == [2]
    assert len(tok.encode("12345")) == 5  # the "smollm" pre-tokenizer splits digits
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    for text in ["Hello, world!", " leading space", "naïve café 🙂 日本語", "def f(x):\n\treturn x**2\n"]:
        assert tok.decode(tok.encode(text)) == text


def test_smollm2_stream(smollm2_tokenizer: Tokenizer) -> None:
    text = "Streaming: émojis 🙂🚀, CJK 日本語のテキスト, Ελληνικά, and ASCII."
    pieces = stream(smollm2_tokenizer, smollm2_tokenizer.encode(text))
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(0, 49151), max_size=30))
def test_smollm2_stream_equals_decode_for_any_ids(smollm2_tokenizer: Tokenizer, ids: list[int]) -> None:
    assert "".join(stream(smollm2_tokenizer, ids)) == smollm2_tokenizer.decode(ids)


@given(text=st.text(max_size=40))
@settings(max_examples=50, deadline=None)
def test_token_bytes_join_to_the_decoded_text_even_where_tokens_split_characters(smollm2_tokenizer: Tokenizer,
                                                                                  text: str) -> None:
    ids = smollm2_tokenizer.encode(text)
    joined = b"".join(smollm2_tokenizer.token_bytes(i) for i in ids)
    assert joined.decode("utf-8", "replace") == smollm2_tokenizer.decode(ids, skip_special_tokens=False)


def test_token_bytes_of_split_characters_are_their_parts(smollm2_tokenizer: Tokenizer) -> None:
    text = "Héllo wörld 日本"
    pieces = [smollm2_tokenizer.token_bytes(i) for i in smollm2_tokenizer.encode(text)]
    assert b"".join(pieces) == text.encode() and b"\x97" in pieces  # 日 spans three tokens


def test_token_bytes_of_a_special_token_are_its_text(smollm2_tokenizer: Tokenizer) -> None:
    assert smollm2_tokenizer.token_bytes(smollm2_tokenizer.encode("<|im_end|>")[0]) == b"<|im_end|>"


def test_json_round_trip_rebuilds_an_equal_tokenizer(tokenizer: Tokenizer) -> None:
    rebuilt = Tokenizer.from_json(tokenizer.to_json(), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, chat_template=tokenizer.chat_template)
    text = "<|im_start|>user\nnaïve 𝄞 text<|im_end|>"
    assert rebuilt.encode(text) == tokenizer.encode(text)
    assert rebuilt.decode(tokenizer.encode(text), skip_special_tokens=False) == text
    assert (rebuilt.vocab_size, rebuilt.all_special_ids) == (tokenizer.vocab_size, tokenizer.all_special_ids)
    assert (rebuilt.bos_token_id, rebuilt.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert rebuilt.apply_chat_template(CHAT) == tokenizer.apply_chat_template(CHAT)


def test_from_json_rejects_what_is_not_a_tokenizer() -> None:
    with pytest.raises(ValueError, match="^backend_json"):
        Tokenizer.from_json("{not json")
