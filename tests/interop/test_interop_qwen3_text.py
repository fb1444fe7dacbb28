"""Text path against transformers: a tiny random Qwen3ForCausalLM (attention_bias=True with
o_proj.bias zeroed: BAGEL's Qwen2 + QK-norm attention) -> the BAGEL layout (language_model.*,
generation expert = copies) -> import -> our logits on a text-only pack equal HF's (fp32, 1e-4)
-> export of the understanding expert -> AutoModelForCausalLM.from_pretrained -> same logits."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from tests.helpers.interop import random_model
from tests.helpers.model_packs import build_batch
from unimedvl_jax.config_load import load_config_file
from unimedvl_jax.interop import keymap as km
from unimedvl_jax.interop.export_torch import export_hf_causal_lm
from unimedvl_jax.interop.import_stream import import_state_dict

TINY = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'tiny.py')
V, H, I, L, NH, NKV, D = 320, 64, 160, 2, 4, 2, 16
OVERRIDES = [f'model.llm.vocab_size={V}', f'model.llm.hidden_size={H}',
             f'model.llm.intermediate_size={I}', f'model.llm.num_layers={L}',
             f'model.llm.num_heads={NH}', f'model.llm.num_kv_heads={NKV}', f'model.llm.head_dim={D}',
             'model.llm.rope_theta=1000000.0', 'model.vit.enabled=False', 'model.vae.enabled=False',
             'data.batch_size=1', 'data.seq_len=40', 'data.max_latent_tokens=0',
             'data.max_vit_patches=0', 'data.max_vae_images=0', 'data.max_sample_tokens=40']
TOL = dict(rtol=1e-4, atol=1e-4)


def bagel_from_qwen3(hf_sd):
  """HF Qwen3 keys -> BAGEL MoT keys; the generation expert gets copies of the understanding one."""
  out = {}
  for k, v in hf_sd.items():
    if k.endswith('self_attn.o_proj.bias'):
      assert float(v.abs().max()) == 0.0
      continue
    if k == 'lm_head.weight':
      out['language_model.lm_head.weight'] = v
      continue
    assert k.startswith('model.'), k
    out['language_model.' + k] = v
    rest = k[len('model.'):]
    if rest.startswith('layers.'):
      i, sub = rest[len('layers.'):].split('.', 1)
      if sub.startswith('mlp.'):
        gen = 'mlp_moe_gen.' + sub[len('mlp.'):]
      else:
        mod, leaf = sub.rsplit('.', 1)
        gen = f'{mod}_moe_gen.{leaf}'
      out[f'language_model.model.layers.{i}.{gen}'] = v.clone()
    elif rest == 'norm.weight':
      out['language_model.model.norm_moe_gen.weight'] = v.clone()
  return out


@pytest.fixture(scope='module')
def setup():
  torch.manual_seed(0)
  hf_cfg = Qwen3Config(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                       num_attention_heads=NH, num_key_value_heads=NKV, head_dim=D,
                       rope_theta=1e6, rms_norm_eps=1e-6, attention_bias=True,
                       tie_word_embeddings=False, attn_implementation='eager')
  hf = Qwen3ForCausalLM(hf_cfg).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if name.endswith('o_proj.bias'):
        p.zero_()
      elif name.endswith('bias') or 'norm' in name:
        p.add_(0.1 * torch.randn_like(p))
  cfg = load_config_file(TINY, OVERRIDES)
  sd = bagel_from_qwen3(hf.state_dict())
  assert {k: tuple(v.shape) for k, v in sd.items()} == km.expected_torch_keys(cfg)
  model = import_state_dict(cfg, sd)
  batch_np = build_batch(cfg, [[[('text', 30, True)]]], seed=3)
  n = 32
  ids = batch_np['input_ids'][0, :n]
  with torch.no_grad():
    ref = hf(torch.from_numpy(ids[None]).long()).logits[0].numpy()

  @jax.jit
  def logits(batch):
    h_u, _, _ = model.forward(batch, jax.random.key(0))
    return model.logits(h_u)

  ours = np.asarray(logits({k: jnp.asarray(v) for k, v in batch_np.items()}))[0]
  assert (batch_np['und_idx'][0] == np.arange(40)).all()
  return cfg, hf, model, ids, ref, ours[:n]


def test_qwen3_import_logits(setup):
  _, _, _, _, ref, ours = setup
  np.testing.assert_allclose(ours, ref, **TOL)


def test_export_understanding_expert_as_hf_causal_lm(setup, tmp_path):
  cfg, hf, model, ids, ref, ours = setup
  n = export_hf_causal_lm(cfg, model, str(tmp_path / 'hf'))
  assert n == len(hf.state_dict())
  loaded, info = AutoModelForCausalLM.from_pretrained(
      str(tmp_path / 'hf'), attn_implementation='eager', dtype=torch.float32,
      output_loading_info=True)
  loaded.eval()
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  assert type(loaded).__name__ == 'Qwen3ForCausalLM'
  sd0, sd1 = hf.state_dict(), loaded.state_dict()
  assert sd0.keys() == sd1.keys()
  for k in sd0:
    assert sd0[k].equal(sd1[k]), k
  with torch.no_grad():
    got = loaded(torch.from_numpy(ids[None]).long()).logits[0].numpy()
  np.testing.assert_array_equal(got, ref)
  np.testing.assert_allclose(got, ours, **TOL)


def test_export_without_qk_norm_is_a_qwen2(tmp_path):
  """A model without QK-norm exports as Qwen2ForCausalLM (q/k/v biases, no o_proj bias)."""
  cfg = load_config_file(TINY, OVERRIDES + ['model.llm.qk_norm=False'])
  model = random_model(cfg, seed=2)
  export_hf_causal_lm(cfg, model, str(tmp_path / 'q2'))
  loaded, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / 'q2'), dtype=torch.float32,
                                                      output_loading_info=True)
  assert type(loaded).__name__ == 'Qwen2ForCausalLM'
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  sd = loaded.state_dict()
  want = np.asarray(model.decoder.layers.und.k_proj.kernel.get_value())[1].T
  np.testing.assert_array_equal(sd['model.layers.1.self_attn.k_proj.weight'].numpy(), want)
  np.testing.assert_array_equal(sd['lm_head.weight'].numpy(),
                                np.asarray(model.lm_head.kernel.get_value()).T)
