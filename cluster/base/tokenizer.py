"""Text <-> token ids for a checkpoint: a ``tokenizers.Tokenizer`` plus special tokens and the chat template."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jinja2
import jinja2.ext
import tokenizers
import tokenizers.decoders
import tokenizers.models
from jinja2.sandbox import ImmutableSandboxedEnvironment

_REPLACEMENT_CHAR = "\ufffd"
LONG_TEXT_CHARS = 2048  # a text longer than this is tokenized without holding the GIL
# Pre-tokenizers that split text but never drop any of it (a Split or Punctuation may, with "Removed").
_KEEPING_PRE_TOKENIZERS = frozenset({"ByteLevel", "Digits", "Split", "Punctuation", "UnicodeScripts"})


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's scheme): printable Latin-1 bytes stand for
    themselves, the other bytes for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


_BYTE_OF_CHAR = _byte_level_alphabet()


class _TokenBound(NamedTuple):
    """What bounds a byte-level BPE's token count from below: no token stands for more than ``max_token_bytes``
    bytes of text, and the bytes in ``dropped`` (no token holds them) yield no token at all."""

    max_token_bytes: int
    dropped: bytes


def _keeps_every_byte(pre_tokenizer: dict[str, Any] | None) -> bool:
    """Whether the pre-tokenizer turns every byte of the text into a byte-level symbol and drops none."""
    if pre_tokenizer is None:
        return False
    parts = pre_tokenizer["pretokenizers"] if pre_tokenizer["type"] == "Sequence" else [pre_tokenizer]
    keeps = all(p["type"] in _KEEPING_PRE_TOKENIZERS and p.get("behavior") != "Removed" for p in parts)
    return keeps and any(p["type"] == "ByteLevel" for p in parts)


def _token_bound(backend: tokenizers.Tokenizer) -> _TokenBound | None:
    """The bound of a byte-level BPE without a normalizer and without added tokens that swallow the whitespace
    beside them; None for any other tokenizer (one may drop or merge text in ways no byte count bounds)."""
    pre_tokenizer = backend.pre_tokenizer
    shape = None if pre_tokenizer is None else json.loads(pre_tokenizer.__getstate__())
    added = backend.get_added_tokens_decoder().values()
    if (backend.normalizer is not None or not isinstance(backend.model, tokenizers.models.BPE)
            or not _keeps_every_byte(shape) or any(token.lstrip or token.rstrip for token in added)):
        return None
    vocab = backend.get_vocab(with_added_tokens=False)
    # Merges only join the byte-level symbols of the text, one character per byte: a piece holds len(piece) bytes.
    max_token_bytes = max(max(map(len, vocab), default=1), *(len(token.content.encode()) for token in added))
    return _TokenBound(max_token_bytes, bytes(sorted(b for c, b in _BYTE_OF_CHAR.items() if c not in vocab)))


class Tokenizer:
    """A checkpoint's tokenizer.

    ``encode`` recognises added/special tokens written in the text (``"<|im_start|>"`` is one id).
    ``bos_token_id``/``eos_token_id`` are the tokenizer's own (``None`` when it has none); a model's full set of
    stop ids is ``ModelConfig.eos_token_ids``.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, chat_template: str | None = None) -> None:
        size = backend.get_vocab_size(with_added_tokens=True)
        for field, value in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)):
            if value is not None and not 0 <= value < size:
                raise ValueError(f"{field}: {value} is outside the vocabulary of {size} tokens")
        self._backend = backend
        self._bos_token_id = bos_token_id
        self._eos_token_id = eos_token_id
        self._chat_template = chat_template
        self._compiled_template: jinja2.Template | None = None
        self._bound = _token_bound(backend)
        added = backend.get_added_tokens_decoder()
        self._special_ids = tuple(sorted(i for i, token in added.items() if token.special))

    @classmethod
    def from_json(cls, backend_json: str, *, bos_token_id: int | None = None, eos_token_id: int | None = None,
                  chat_template: str | None = None) -> Tokenizer:
        """Rebuilds a tokenizer from ``to_json()`` and its special ids and chat template (a worker's TokenizerSpec).

        Raises ValueError naming ``backend_json`` when it is not a ``tokenizers`` JSON.
        """
        try:
            backend = tokenizers.Tokenizer.from_str(backend_json)
        except Exception as error:  # the Rust side raises a bare Exception
            raise ValueError(f"backend_json: not a tokenizers JSON: {error}") from error
        return cls(backend, bos_token_id=bos_token_id, eos_token_id=eos_token_id, chat_template=chat_template)

    def to_json(self) -> str:
        """The ``tokenizers`` JSON of the backend (vocabulary, merges, normalizers, added tokens)."""
        return self._backend.to_str()

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's embedding may have more rows)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_id

    @property
    def all_special_ids(self) -> tuple[int, ...]:
        """Ids of the special tokens, ascending; ``decode`` drops them when ``skip_special_tokens``."""
        return self._special_ids

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies the tokenizer's post-processor (e.g. a BOS).

        A text over ``LONG_TEXT_CHARS`` is tokenized without holding the GIL, so other threads run meanwhile.
        """
        if not isinstance(text, str):
            raise ValueError(f"text: must be a str, got {type(text).__name__}")
        if len(text) > LONG_TEXT_CHARS:  # encode holds the GIL throughout; encode_batch releases it
            return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def min_num_tokens(self, text: str) -> int:
        """A lower bound on ``len(encode(text))``, found without tokenizing, in time linear in the text.

        For a byte-level BPE (no normalizer, no pre-tokenizer dropping text, no added token stripping the
        whitespace beside it) it is ``ceil(b / max_token_bytes)``, ``b`` counting the text's UTF-8 bytes that
        some token holds; 0 for other tokenizers. Raises ValueError naming ``text`` when UTF-8 cannot encode it
        (a lone surrogate), which ``encode`` cannot tokenize either.
        """
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"text: must be text UTF-8 can encode: {error.reason} at character {error.start}") \
                from None
        if self._bound is None:
            return 0
        return -(-len(data.translate(None, self._bound.dropped)) // self._bound.max_token_bytes)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; an incomplete or invalid UTF-8 byte sequence decodes to U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token ``token_id`` stands for, alone: a byte-level BPE token may hold part of a multi-byte
        character, which ``decode`` would show as U+FFFD. Special tokens give their text's UTF-8 bytes."""
        piece = self._backend.id_to_token(token_id)
        if piece is not None and isinstance(self._backend.decoder, tokenizers.decoders.ByteLevel):
            raw = [_BYTE_OF_CHAR.get(char) for char in piece]
            if all(b is not None for b in raw):
                return bytes(raw)  # type: ignore[arg-type]
        return self.decode([token_id], skip_special_tokens=False).encode()

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` (each with str ``role`` and ``content``) with the checkpoint's chat template.

        The result already holds the template's special tokens: encode it with ``add_special_tokens=False``.
        """
        _check_messages(messages)
        template = self._template()
        try:
            return template.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                                   bos_token=self._token_text(self._bos_token_id),
                                   eos_token=self._token_text(self._eos_token_id))
        except jinja2.TemplateError as error:
            raise ValueError(f"messages: the chat template rejected them: {error}") from error

    def _template(self) -> jinja2.Template:
        if self._chat_template is None:
            raise ValueError("messages: this model has no chat template; send a plain prompt instead")
        if self._compiled_template is None:
            self._compiled_template = _compile_template(self._chat_template)
        return self._compiled_template

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self._backend.id_to_token(token_id)


def _check_messages(messages: Sequence[Mapping[str, str]]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages: must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}]: must be an object with 'role' and 'content'")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ValueError(f"messages[{i}].{key}: must be a string")


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _compile_template(source: str) -> jinja2.Template:
    # Chat templates are written against Hugging Face's rendering, which trims block whitespace and allows
    # loop controls; templates call raise_exception() to reject conversations they cannot express.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateError as error:
        raise ValueError(f"messages: the model's chat template does not compile: {error}") from error


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas for streaming.

    ``push`` returns the text completed by one more id. Text that may still change (a multi-byte character split
    across tokens decodes to a trailing U+FFFD until its last byte arrives) is held back; ``finish`` releases it at
    the end of the stream. The concatenation of every ``push`` and ``finish`` — also ``text`` after ``finish`` —
    equals ``tokenizer.decode(all_ids, skip_special_tokens)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        # Each push re-decodes ids[_prefix:]; ids[_prefix:_read] were emitted last time and give the decoder the
        # context it needs (e.g. a leading-space rule), ids[_read:] are not emitted yet.
        self._prefix = 0
        self._read = 0
        self._text = ""

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return self._text

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text ("" while a character is incomplete)."""
        self._ids.append(token_id)
        window = self._decode(self._prefix, len(self._ids))
        if window.endswith(_REPLACEMENT_CHAR):
            return ""
        return self._emit(window)

    def finish(self) -> str:
        """Return the held-back text, U+FFFD for bytes that never formed a character."""
        if self._read == len(self._ids):
            return ""
        return self._emit(self._decode(self._prefix, len(self._ids)))

    def _emit(self, window: str) -> str:
        delta = window[len(self._decode(self._prefix, self._read)):]
        self._prefix, self._read = self._read, len(self._ids)
        self._text += delta
        return delta

    def _decode(self, start: int, stop: int) -> str:
        if start == stop:
            return ""
        return self._tokenizer.decode(self._ids[start:stop], skip_special_tokens=self._skip_special_tokens)
