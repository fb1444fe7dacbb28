"""Tokenizers behind one interface: SentencePiece (the embedded dataset's) or a Qwen2 tokenizer.json.

`Tokenizer` interface:
  encode(text) -> list[int]    no special tokens added (special-token strings written in the text
                               are matched as their ids, as Qwen2's tokenizer does)
  decode(ids) -> str           special tokens (the four markers, pad, control ids) are skipped
  vocab_size                   number of ids the tokenizer can produce (model vocab must be >=)
  im_start, im_end, vision_start, vision_end, pad_id   ids of the markers, found BY NAME
The four markers (SPEC section 3) are SPECIAL_TOKENS; a tokenizer lacking one is an error.

`train_sentencepiece(lines, out_prefix, vocab_size, seed=0)` trains a small, deterministic
SentencePiece model (the markers as user-defined symbols, pad id 0, unk id 1, byte fallback so any
text encodes, one thread) in seconds.
"""

from __future__ import annotations

import io
import os
from typing import Iterable, Sequence

IM_START, IM_END = '<|im_start|>', '<|im_end|>'
VISION_START, VISION_END = '<|vision_start|>', '<|vision_end|>'
SPECIAL_TOKENS = (IM_START, IM_END, VISION_START, VISION_END)
PAD_CANDIDATES = ('<|endoftext|>', '<pad>', '[PAD]', '<|pad|>', '<|padding|>')


class TokenizerError(ValueError):
  """A tokenizer file that is missing, corrupt, or lacks a required special token."""


class Tokenizer:
  """The interface. Subclasses set the ids and implement `encode` / `decode` / `vocab_size`."""

  path: str = ''
  im_start: int
  im_end: int
  vision_start: int
  vision_end: int
  pad_id: int

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def decode(self, ids: Sequence[int]) -> str:
    raise NotImplementedError

  @property
  def vocab_size(self) -> int:
    raise NotImplementedError

  @property
  def special_ids(self) -> frozenset[int]:
    return frozenset((self.im_start, self.im_end, self.vision_start, self.vision_end, self.pad_id))

  def __repr__(self) -> str:
    return (f'{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, '
            f'im_start={self.im_start}, im_end={self.im_end}, vision_start={self.vision_start}, '
            f'vision_end={self.vision_end}, pad_id={self.pad_id})')


def _encode_error(path: str, text, e: Exception) -> TokenizerError:
  """A clear TokenizerError for a text the tokenizer cannot encode (lone surrogates, non-str)."""
  if not isinstance(text, str):
    why = f'expected a str, got {type(text).__name__}'
  else:
    try:
      text.encode('utf-8')
      why = f'{type(e).__name__}: {str(e)[:200]}'
    except UnicodeEncodeError as u:
      why = f'not valid Unicode ({u.reason} {text[u.start:u.end]!r} at character {u.start})'
  return TokenizerError(f'tokenizer {path} cannot encode the text {str(text)[:60]!r}: {why}')


def _check_file(path: str, what: str) -> None:
  if not path:
    raise TokenizerError(f'{what}: no path given')
  if not os.path.exists(path):
    raise TokenizerError(f'{what} not found: {path}')
  if os.path.isdir(path):
    raise TokenizerError(f'{what} is a directory, expected a file: {path}')


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece `.model` file containing the four markers as pieces."""

  def __init__(self, model_path: str | os.PathLike):
    import sentencepiece as spm
    self.path = os.fspath(model_path)
    _check_file(self.path, 'SentencePiece model')
    sp = spm.SentencePieceProcessor()
    try:
      with open(self.path, 'rb') as f:
        proto = f.read()
      sp.LoadFromSerializedProto(proto)
    except Exception as e:  # noqa: BLE001  (sentencepiece raises RuntimeError / OSError)
      raise TokenizerError(f'corrupt SentencePiece model {self.path}: {type(e).__name__}: {e}') from None
    if sp.get_piece_size() <= 0:
      raise TokenizerError(f'corrupt SentencePiece model {self.path}: empty vocabulary')
    self._sp = sp
    ids = {}
    for tok in SPECIAL_TOKENS:
      i = sp.piece_to_id(tok)
      if i == sp.unk_id() or sp.id_to_piece(i) != tok:
        raise TokenizerError(f'SentencePiece model {self.path} lacks the special token {tok!r}')
      ids[tok] = i
    self.im_start, self.im_end = ids[IM_START], ids[IM_END]
    self.vision_start, self.vision_end = ids[VISION_START], ids[VISION_END]
    pad = sp.pad_id()
    self.pad_id = pad if pad >= 0 else self.im_end
    self._skip = set(self.special_ids)
    for i in range(sp.get_piece_size()):
      if sp.is_control(i):
        self._skip.add(i)

  def encode(self, text: str) -> list[int]:
    try:
      return list(self._sp.encode(text, out_type=int))
    except Exception as e:  # noqa: BLE001  (pybind11 cast errors are RuntimeErrors)
      raise _encode_error(self.path, text, e) from None

  def decode(self, ids: Sequence[int]) -> str:
    n = self._sp.get_piece_size()
    keep = [int(i) for i in ids if int(i) not in self._skip and 0 <= int(i) < n]
    return self._sp.decode(keep)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json` (e.g. Qwen2.5's) loaded with the `tokenizers` package."""

  def __init__(self, tokenizer_json_path: str | os.PathLike):
    from tokenizers import Tokenizer as _HFTok
    p = os.fspath(tokenizer_json_path)
    if os.path.isdir(p):   # a model directory: use its tokenizer.json
      p = os.path.join(p, 'tokenizer.json')
    self.path = p
    _check_file(self.path, 'tokenizer.json')
    try:
      self._tok = _HFTok.from_file(self.path)
    except Exception as e:  # noqa: BLE001  (tokenizers raises Exception subclasses from Rust)
      raise TokenizerError(f'corrupt tokenizer.json {self.path}: {type(e).__name__}: '
                           f'{str(e)[:300]}') from None
    ids = {}
    for tok in SPECIAL_TOKENS:
      i = self._tok.token_to_id(tok)
      if i is None:
        raise TokenizerError(f'tokenizer.json {self.path} lacks the special token {tok!r}')
      ids[tok] = i
    self.im_start, self.im_end = ids[IM_START], ids[IM_END]
    self.vision_start, self.vision_end = ids[VISION_START], ids[VISION_END]
    pad = None
    padding = self._tok.padding
    if padding and padding.get('pad_id') is not None and padding.get('pad_token'):
      pad = self._tok.token_to_id(padding['pad_token'])
    for cand in PAD_CANDIDATES:
      if pad is not None:
        break
      pad = self._tok.token_to_id(cand)
    self.pad_id = pad if pad is not None else self.im_end
    self._skip = set(self.special_ids)

  def encode(self, text: str) -> list[int]:
    try:
      return list(self._tok.encode(text, add_special_tokens=False).ids)
    except Exception as e:  # noqa: BLE001  (tokenizers raises TypeError / Rust exceptions)
      raise _encode_error(self.path, text, e) from None

  def decode(self, ids: Sequence[int]) -> str:
    keep = [int(i) for i in ids if int(i) not in self._skip]
    return self._tok.decode(keep, skip_special_tokens=True)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)


def load_tokenizer(kind: str, path: str | os.PathLike) -> Tokenizer:
  """kind: 'sentencepiece' (a .model file) or 'hf' (a tokenizer.json or a directory holding one)."""
  if kind == 'sentencepiece':
    return SentencePieceTokenizer(path)
  if kind == 'hf':
    return HFTokenizer(path)
  raise TokenizerError(f"unknown tokenizer kind {kind!r}; expected 'sentencepiece' or 'hf'")


def train_sentencepiece(lines: Iterable[str], out_prefix: str | os.PathLike, vocab_size: int,
                        seed: int = 0, model_type: str = 'unigram') -> str:
  """Trains a SentencePiece model on `lines`; writes `{out_prefix}.model`; returns its path.

  Deterministic for the same lines, vocab_size and seed (one thread, no sampling of the input;
  the written bytes do not depend on out_prefix). The four markers are user-defined symbols
  (ids 2..5), pad id 0, unk id 1, no BOS/EOS, byte fallback (any UTF-8 text encodes), no
  normalization (decode(encode(text)) == text, whitespace and newlines included).
  `vocab_size` is an upper bound: a corpus too small for it gives a smaller vocabulary.
  """
  import sentencepiece as spm
  out_prefix = os.fspath(out_prefix)
  lines = [ln.replace('\n', ' ') for ln in lines if ln and ln.strip()]
  if not lines:
    raise ValueError('train_sentencepiece: no text to train on')
  buf = io.BytesIO()
  spm.set_random_generator_seed(int(seed))
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines),
      model_writer=buf,
      model_type=model_type,
      vocab_size=int(vocab_size),
      hard_vocab_limit=False,
      character_coverage=1.0,
      byte_fallback=True,
      normalization_rule_name='identity',   # lossless: decode(encode(t)) == t, newlines too
      remove_extra_whitespaces=False,
      user_defined_symbols=list(SPECIAL_TOKENS),
      pad_id=0, unk_id=1, bos_id=-1, eos_id=-1,
      pad_piece='<pad>', unk_piece='<unk>',
      num_threads=1,
      input_sentence_size=0,
      shuffle_input_sentence=False,
      split_digits=True,
      minloglevel=2,
  )
  path = out_prefix + '.model'
  d = os.path.dirname(path)
  if d:
    os.makedirs(d, exist_ok=True)
  with open(path, 'wb') as f:
    f.write(buf.getvalue())
  return path
