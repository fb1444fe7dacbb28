"""The key map on the abstract 7B model (nnx.eval_shape, nothing allocated): exactly the 1223
keys and shapes of SPEC section 8; the FLUX ae.safetensors key set; transforms invert."""

import os
import re

import numpy as np
import pytest

from unimedvl_jax.config_load import load_config_file
from unimedvl_jax.interop import keymap as km

CFG_7B = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'unimedvl_7b.py')


@pytest.fixture(scope='module')
def keys_7b():
  cfg = load_config_file(CFG_7B)
  entries = km.model_entries(cfg)
  return cfg, km.expected_keys_from_entries(entries, km.MODEL_FILE), \
      km.expected_keys_from_entries(entries, km.VAE_FILE)


def spec_section8_keys():
  """SPEC section 8 written out literally (i < 28, j < 26, E in '', '_moe_gen')."""
  H, V, I, KV, D, VH, VI = 3584, 152064, 18944, 512, 128, 1152, 4304
  k = {'language_model.model.embed_tokens.weight': (V, H),
       'language_model.model.norm.weight': (H,), 'language_model.model.norm_moe_gen.weight': (H,),
       'language_model.lm_head.weight': (V, H)}
  for i in range(28):
    p = f'language_model.model.layers.{i}.'
    for E in ('', '_moe_gen'):
      for n, o in (('q', H), ('k', KV), ('v', KV)):
        k[f'{p}self_attn.{n}_proj{E}.weight'] = (o, H)
        k[f'{p}self_attn.{n}_proj{E}.bias'] = (o,)
      k[f'{p}self_attn.o_proj{E}.weight'] = (H, H)
      k[f'{p}self_attn.q_norm{E}.weight'] = (D,)
      k[f'{p}self_attn.k_norm{E}.weight'] = (D,)
      k[f'{p}mlp{E}.gate_proj.weight'] = (I, H)
      k[f'{p}mlp{E}.up_proj.weight'] = (I, H)
      k[f'{p}mlp{E}.down_proj.weight'] = (H, I)
      k[f'{p}input_layernorm{E}.weight'] = (H,)
      k[f'{p}post_attention_layernorm{E}.weight'] = (H,)
  v = 'vit_model.vision_model.'
  k[v + 'embeddings.patch_embedding.weight'] = (VH, 588)
  k[v + 'embeddings.patch_embedding.bias'] = (VH,)
  k[v + 'embeddings.position_embedding.weight'] = (4900, VH)
  for j in range(26):
    p = f'{v}encoder.layers.{j}.'
    for n in ('q', 'k', 'v', 'out'):
      k[f'{p}self_attn.{n}_proj.weight'] = (VH, VH)
      k[f'{p}self_attn.{n}_proj.bias'] = (VH,)
    for n in ('layer_norm1', 'layer_norm2'):
      k[f'{p}{n}.weight'] = (VH,)
      k[f'{p}{n}.bias'] = (VH,)
    k[f'{p}mlp.fc1.weight'], k[f'{p}mlp.fc1.bias'] = (VI, VH), (VI,)
    k[f'{p}mlp.fc2.weight'], k[f'{p}mlp.fc2.bias'] = (VH, VI), (VH,)
  k[v + 'post_layernorm.weight'] = (VH,)
  k[v + 'post_layernorm.bias'] = (VH,)
  k['connector.fc1.weight'], k['connector.fc1.bias'] = (H, VH), (H,)
  k['connector.fc2.weight'], k['connector.fc2.bias'] = (H, H), (H,)
  k['vit_pos_embed.pos_embed'] = (4900, H)
  k['latent_pos_embed.pos_embed'] = (4096, H)
  k['time_embedder.mlp.0.weight'], k['time_embedder.mlp.0.bias'] = (H, 256), (H,)
  k['time_embedder.mlp.2.weight'], k['time_embedder.mlp.2.bias'] = (H, H), (H,)
  k['vae2llm.weight'], k['vae2llm.bias'] = (H, 64), (H,)
  k['llm2vae.weight'], k['llm2vae.bias'] = (64, H), (64,)
  return k


def test_7b_has_exactly_the_1223_spec_keys(keys_7b):
  _, model_keys, _ = keys_7b
  assert len(model_keys) == 1223
  assert model_keys == spec_section8_keys()
  n_params = sum(int(np.prod(s)) for s in model_keys.values())
  assert n_params == 14_607_260_128          # SPEC section 2 (without the VAE)


def test_7b_vae_is_the_flux_autoencoder(keys_7b):
  cfg, _, vae_keys = keys_7b
  assert vae_keys == km.flux_ae_keys(cfg.model.vae)
  assert len(vae_keys) == 244
  assert vae_keys['encoder.conv_in.weight'] == (128, 3, 3, 3)
  assert vae_keys['decoder.conv_in.weight'] == (512, 16, 3, 3)
  assert vae_keys['encoder.mid.attn_1.q.weight'] == (512, 512, 1, 1)
  assert not any(re.search(r'decoder\.up\.0\.upsample', k) for k in vae_keys)
  # FLUX AE: ~84 M parameters (SPEC section 2)
  assert 80e6 < sum(int(np.prod(s)) for s in vae_keys.values()) < 90e6


@pytest.mark.parametrize('transform,shape', [('identity', (3, 4)), ('linear', (3, 5)),
                                             ('conv', (3, 3, 4, 6)), ('conv1x1', (4, 6))])
def test_transforms_invert(transform, shape):
  a = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  t = km.to_torch_layout(a, transform)
  assert t.shape == km.torch_shape(shape, transform)
  np.testing.assert_array_equal(km.from_torch_layout(np.ascontiguousarray(t), transform), a)
  if transform == 'linear':                   # y = x @ W (ours) == x @ weight.T (torch)
    x = np.ones((2, shape[0]), np.float32)
    np.testing.assert_allclose(x @ a, x @ t.T)


def test_unknown_parameter_path_is_an_error():
  with pytest.raises(km.KeyMapError, match='decoder/layers/und/new_thing/kernel'):
    km.torch_name(('decoder', 'layers', 'und', 'new_thing', 'kernel'), 2)
  with pytest.raises(km.KeyMapError, match='lora_a'):
    km.torch_name(('lm_head', 'lora_a'), 2)
