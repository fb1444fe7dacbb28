"""Tokenizers (data/tokenizer.py): SentencePiece training and loading, a Qwen2-style tokenizer.json."""

from __future__ import annotations

import json

import pytest

from unimedvl_jax.data import tokenizer as T

CORPUS = [
    'Findings: There is one hyperintense lesion. A large round lesion in the upper left quadrant.',
    'Findings: No focal lesion is seen. The brain appears normal. Impression: No lesion.',
    'Is there a lesion in the lower right quadrant? Answer the question using a single word.',
    'Generate a T1-weighted brain MRI with two lesions in the upper right and lower left.',
    'What would this chest X-ray look like without the lesion?',
] * 40


@pytest.fixture(scope='module')
def sp_model(tmp_path_factory):
  return T.train_sentencepiece(CORPUS, str(tmp_path_factory.mktemp('sp') / 'tok'), 300)


def test_train_sentencepiece_deterministic(tmp_path, sp_model):
  p2 = T.train_sentencepiece(CORPUS, str(tmp_path / 'other' / 'name'), 300)
  assert p2.endswith('name.model')
  with open(sp_model, 'rb') as a, open(p2, 'rb') as b:
    assert a.read() == b.read()


def test_sentencepiece_specials_by_name(sp_model):
  tok = T.load_tokenizer('sentencepiece', sp_model)
  assert isinstance(tok, T.SentencePieceTokenizer) and isinstance(tok, T.Tokenizer)
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=sp_model)
  for name, attr in zip(T.SPECIAL_TOKENS, ('im_start', 'im_end', 'vision_start', 'vision_end')):
    assert sp.id_to_piece(getattr(tok, attr)) == name
  assert sp.id_to_piece(tok.pad_id) == '<pad>' and tok.pad_id == 0
  assert len(tok.special_ids) == 5
  assert 6 < tok.vocab_size <= 300


def test_sentencepiece_roundtrip_and_byte_fallback(sp_model):
  tok = T.SentencePieceTokenizer(sp_model)
  for text in ('A large round lesion in the upper left quadrant.',
               'Ünïcödé 肺 x-ray 42% <b>', 'zzzz qqq'):
    ids = tok.encode(text)
    assert ids and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
  ids = tok.encode('肺')
  assert 1 not in ids   # byte fallback: never <unk>
  # encode adds no special token; decode skips them.
  ids = tok.encode('hello lesion')
  assert not set(ids) & tok.special_ids
  assert tok.decode([tok.im_start] + ids + [tok.im_end, tok.pad_id, tok.vision_start]) == 'hello lesion'


def test_sentencepiece_small_corpus_gives_smaller_vocab(tmp_path):
  p = T.train_sentencepiece(['tiny corpus'] * 3, str(tmp_path / 't'), 1000)
  tok = T.SentencePieceTokenizer(p)
  assert tok.vocab_size < 1000
  assert tok.decode(tok.encode('anything at all')) == 'anything at all'


def test_sentencepiece_errors(tmp_path):
  with pytest.raises(T.TokenizerError, match='not found.*missing.model'):
    T.load_tokenizer('sentencepiece', str(tmp_path / 'missing.model'))
  bad = tmp_path / 'bad.model'
  bad.write_bytes(b'\x00garbage' * 10)
  with pytest.raises(T.TokenizerError, match='corrupt.*bad.model'):
    T.SentencePieceTokenizer(bad)
  # A model without the markers.
  import io
  import sentencepiece as spm
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=60,
                                 hard_vocab_limit=False, num_threads=1, minloglevel=2)
  plain = tmp_path / 'plain.model'
  plain.write_bytes(buf.getvalue())
  with pytest.raises(T.TokenizerError, match=r'lacks the special token.*im_start'):
    T.SentencePieceTokenizer(plain)
  with pytest.raises(T.TokenizerError, match='unknown tokenizer kind'):
    T.load_tokenizer('bpe', str(plain))
  with pytest.raises(ValueError):
    T.train_sentencepiece(['', '  '], str(tmp_path / 'e'), 100)


def _qwen_like_tokenizer_json(path):
  """A small byte-level BPE tokenizer.json with Qwen2's special tokens as added tokens."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=['<|endoftext|>'],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(CORPUS, trainer)
  tok.add_special_tokens(list(T.SPECIAL_TOKENS))
  tok.save(str(path))
  return tok


def test_hf_tokenizer(tmp_path):
  ref = _qwen_like_tokenizer_json(tmp_path / 'tokenizer.json')
  tok = T.load_tokenizer('hf', str(tmp_path / 'tokenizer.json'))
  assert isinstance(tok, T.HFTokenizer)
  assert tok.im_start == ref.token_to_id('<|im_start|>')
  assert tok.im_end == ref.token_to_id('<|im_end|>')
  assert tok.vision_start == ref.token_to_id('<|vision_start|>')
  assert tok.vision_end == ref.token_to_id('<|vision_end|>')
  assert tok.pad_id == ref.token_to_id('<|endoftext|>')
  assert tok.vocab_size == ref.get_vocab_size(with_added_tokens=True)
  text = 'A large round lesion in the upper left quadrant. Ünï 肺'
  ids = tok.encode(text)
  assert ids == ref.encode(text, add_special_tokens=False).ids
  assert not set(ids) & tok.special_ids
  assert tok.decode(ids) == text
  assert tok.decode([tok.im_start] + ids + [tok.im_end, tok.pad_id]) == text
  # A directory holding tokenizer.json works too.
  assert T.load_tokenizer('hf', str(tmp_path)).im_end == tok.im_end


def test_hf_tokenizer_errors(tmp_path):
  with pytest.raises(T.TokenizerError, match='not found.*nothing.json'):
    T.HFTokenizer(tmp_path / 'nothing.json')
  (tmp_path / 'bad.json').write_text('{"not": "a tokenizer"')
  with pytest.raises(T.TokenizerError, match='corrupt tokenizer.json.*bad.json'):
    T.HFTokenizer(tmp_path / 'bad.json')
  from tokenizers import Tokenizer, models
  t = Tokenizer(models.WordLevel({'a': 0, '[UNK]': 1}, unk_token='[UNK]'))
  t.add_special_tokens(['<|im_start|>', '<|im_end|>'])
  t.save(str(tmp_path / 'partial.json'))
  with pytest.raises(T.TokenizerError, match='vision_start'):
    T.HFTokenizer(tmp_path / 'partial.json')
  assert json.loads((tmp_path / 'partial.json').read_text())   # valid json, just incomplete


def test_sentencepiece_lossless_whitespace(sp_model):
  tok = T.SentencePieceTokenizer(sp_model)
  for text in ('Is there a lesion?\nAnswer the question.', 'two  spaces', 'Ｆｕｌｌ width',
               'tab\there'):
    assert tok.decode(tok.encode(text)) == text
