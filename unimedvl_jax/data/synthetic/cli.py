"""The command line of the generator: `python -m unimedvl_jax.data.synthetic --out DIR ...`."""

from __future__ import annotations

import argparse
import json
import os
import time

from unimedvl_jax.data.synthetic.common import SPLITS
from unimedvl_jax.data.synthetic.writer import generate


def _usage() -> str:
  from unimedvl_jax.data import synthetic
  return synthetic.__doc__


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog='python -m unimedvl_jax.data.synthetic', description=_usage(),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--out', required=True, help='output directory (the data root)')
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--size', type=int, default=64, help='image side in pixels (multiple of 16)')
  ap.add_argument('--n-subjects', type=int, default=2400, help='synthetic subjects, all splits')
  ap.add_argument('--val-fraction', type=float, default=0.05)
  ap.add_argument('--test-fraction', type=float, default=0.08)
  ap.add_argument('--vocab-size', type=int, default=1000)
  ap.add_argument('--no-real', action='store_true', help='leave out the real sample files')
  a = ap.parse_args(argv)
  t0 = time.time()
  m = generate(a.out, seed=a.seed, size=a.size, n_subjects=a.n_subjects,
               val_fraction=a.val_fraction, test_fraction=a.test_fraction,
               vocab_size=a.vocab_size, include_real=not a.no_real)
  tot = {s: sum(c['total'] for c in m['counts'][s].values()) for s in SPLITS}
  print(json.dumps(dict(out=os.path.abspath(a.out), samples=tot, subjects=m['subjects'],
                        vocab_size=m['tokenizer']['vocab_size'],
                        seconds=round(time.time() - t0, 1))))
  return 0

