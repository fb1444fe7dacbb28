"""SPEC section 3's attention rule read literally, element by element in plain python: the
independent reference of the mask tests (tests/model/test_attention_mask.py, test_mot.py)."""

import numpy as np

from unimedvl_jax.batch import MODE_CAUSAL as C  # noqa: F401
from unimedvl_jax.batch import MODE_FULL as F
from unimedvl_jax.batch import MODE_NOISE as N


def literal_rule(seg, split, mode):
  """The SPEC sentence, element by element, in plain python."""
  T = len(seg)
  out = np.zeros((T, T), bool)
  for q in range(T):
    for k in range(T):
      a, b = split[q], split[k]
      same_sample = seg[q] == seg[k] and seg[q] != 0
      order_ok = b < a or (b == a and (mode[q] in (F, N) or k <= q))
      noise_hidden = mode[k] == N and b != a
      out[q, k] = same_sample and order_ok and not noise_hidden
  return out
