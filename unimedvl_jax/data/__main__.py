"""Data tools.

    python -m unimedvl_jax.data check --data FILE.jsonl [--data MORE.jsonl] [--root DIR]
                                      [--tokenizer PATH] [--config configs/tiny.py]
                                      [--set data.seq_len=1024]
        Reads every sample through the real pipeline; prints a JSON report (samples read,
        usable, skipped by reason with example file:line locations, packing efficiency).
        The tokenizer: --tokenizer PATH (SentencePiece .model or HF tokenizer.json), else
        config.data.tokenizer_path, a tokenizer.model at the root / beside the data, else the
        embedded dataset's. Exit status 0, or 1 with --strict when any file failed or the bad
        fraction exceeds config.data.max_bad_fraction; 2 when the check cannot run.

    python -m unimedvl_jax.data cache-latents --config C --data DIR [--checkpoint CKPT]
                                              [--out DIR/latent_cache] [--split train ...]
        Encodes every VAE image of the dataset under DIR (the config's groups, or every
        DIR/<split>/*.jsonl) once with the frozen VAE of CKPT (a training workdir or checkpoint
        folder; without one, the config's freshly initialised VAE) and writes the posterior
        moments to a tensorstore zarr cache (data/latent_cache.py). Train from it with
        --config.data.latent_cache=OUT. Prints a JSON summary; exit 2 on an error.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog='python -m unimedvl_jax.data', description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest='cmd', required=True)
  c = sub.add_parser('check', help='check JSONL data through the real pipeline')
  c.add_argument('--data', action='append', required=True,
                 help='a JSONL file (repeat, or comma-separate, for several)')
  c.add_argument('--root', default=None,
                 help='data root for relative image paths (default: config.data.root, else the '
                      "JSONL's directory, or its parent when that is train/ val/ test/)")
  c.add_argument('--tokenizer', default=None, metavar='PATH',
                 help='a SentencePiece .model or a Hugging Face tokenizer.json (or its '
                      "directory); default: config.data.tokenizer_path, a tokenizer.model at the "
                      "root or beside the data, else the embedded dataset's tokenizer")
  c.add_argument('--tokenizer-kind', default=None, choices=('sentencepiece', 'hf'),
                 help='the kind of --tokenizer (default: hf for *.json, else sentencepiece)')
  c.add_argument('--config', default=None,
                 help='a configs/*.py file (default: built-in tiny shapes)')
  c.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                 help='config override, e.g. data.seq_len=1024 (repeatable)')
  c.add_argument('--strict', action='store_true', help='exit 1 when the data is not ok')
  lc = sub.add_parser('cache-latents', help='write the latent cache of a dataset')
  lc.add_argument('--config', required=True, help='a configs/*.py file')
  lc.add_argument('--data', required=True, help='the dataset root (its JSONL groups)')
  lc.add_argument('--checkpoint', default=None,
                  help='training workdir / checkpoint folder whose VAE encodes (default: the '
                       "config's initial VAE)")
  lc.add_argument('--out', default=None, help='cache directory (default: DATA/latent_cache)')
  lc.add_argument('--split', action='append', default=None, help='splits to cache (train)')
  lc.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE')
  args = ap.parse_args(argv)
  if args.cmd == 'cache-latents':
    return _cache_latents(args)

  from unimedvl_jax.data.check import builtin_config, check
  from unimedvl_jax.data.jsonl import DataError
  files = [f for d in args.data for f in d.split(',') if f]
  try:
    if args.config:
      from unimedvl_jax.config_load import load_config_file
      cfg = load_config_file(args.config, args.set)
    else:
      from unimedvl_jax.config_load import parse_override, set_field
      from unimedvl_jax.config_validate import validate
      cfg = builtin_config()
      for ov in args.set:
        set_field(cfg, *parse_override(ov))
      validate(cfg)
    report = check(files, root=args.root, cfg=cfg, tokenizer=args.tokenizer,
                   tokenizer_kind=args.tokenizer_kind, fit_vocab=not args.config)
  except (DataError, FileNotFoundError, ValueError) as e:
    print(json.dumps({'error': f'{type(e).__name__}: {e}'}, indent=2))
    return 2
  print(json.dumps(report, indent=2))
  return 1 if args.strict and not report['ok'] else 0


def _cache_latents(args) -> int:
  import os
  from unimedvl_jax.config import ConfigError
  from unimedvl_jax.config_load import load_config_file
  from unimedvl_jax.data import latent_cache
  from unimedvl_jax.data.jsonl import DataError
  try:
    cfg = load_config_file(args.config, args.set)
    cfg.data.root = os.path.abspath(args.data)
    cfg.data.latent_cache = ''
    if args.checkpoint:
      from unimedvl_jax.infer.loading import load_checkpoint
      _, model = load_checkpoint(args.checkpoint, use_ema=False)
    else:
      from flax import nnx
      from unimedvl_jax.model.unimedvl import UniMedVL
      model = UniMedVL(cfg.model, rngs=nnx.Rngs(cfg.seed))
    if not getattr(model, 'has_vae', False):
      raise ConfigError('the model has no VAE (model.vae.enabled is False)')
    out = args.out or os.path.join(cfg.data.root, 'latent_cache')
    summary = latent_cache.build(cfg, model, cfg.data.root, out, splits=tuple(args.split or
                                                                               ('train',)))
  except (DataError, ConfigError, FileNotFoundError, ValueError, OSError) as e:
    print(json.dumps({'error': f'{type(e).__name__}: {e}'}, indent=2))
    return 2
  except Exception as e:  # noqa: BLE001 - e.g. LoadError from the checkpoint loader
    print(json.dumps({'error': f'{type(e).__name__}: {e}'}, indent=2))
    return 2
  print(json.dumps(summary, indent=2))
  return 0


if __name__ == '__main__':
  sys.exit(main())
