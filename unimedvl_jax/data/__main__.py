"""Data tools.

    python -m unimedvl_jax.data check --data FILE.jsonl [--data MORE.jsonl] [--root DIR]
                                      [--config configs/tiny.py] [--set data.seq_len=1024]
        Reads every sample through the real pipeline; prints a JSON report (samples read,
        usable, skipped by reason with example file:line locations, packing efficiency).
        Exit status 0, or 1 with --strict when any file failed or the bad fraction exceeds
        config.data.max_bad_fraction.
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
  c.add_argument('--config', default=None,
                 help='a configs/*.py file (default: built-in tiny shapes)')
  c.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                 help='config override, e.g. data.seq_len=1024 (repeatable)')
  c.add_argument('--strict', action='store_true', help='exit 1 when the data is not ok')
  args = ap.parse_args(argv)

  from unimedvl_jax.data.check import builtin_config, check
  from unimedvl_jax.data.jsonl import DataError
  files = [f for d in args.data for f in d.split(',') if f]
  try:
    if args.config:
      from unimedvl_jax.config import load_config_file
      cfg = load_config_file(args.config, args.set)
    else:
      import ast
      from unimedvl_jax.config import ConfigError, validate
      cfg = builtin_config()
      for ov in args.set:
        key, _, raw = ov.partition('=')
        node, parts = cfg, key.removeprefix('config.').split('.')
        for p in parts[:-1]:
          if p not in node:
            raise ConfigError(f'config.{key}: no such field')
          node = node[p]
        try:
          value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
          value = raw
        node[parts[-1]] = float(value) if isinstance(node[parts[-1]], float) else value
      validate(cfg)
    report = check(files, root=args.root, cfg=cfg)
  except (DataError, FileNotFoundError, ValueError) as e:
    print(json.dumps({'error': f'{type(e).__name__}: {e}'}, indent=2))
    return 2
  print(json.dumps(report, indent=2))
  return 1 if args.strict and not report['ok'] else 0


if __name__ == '__main__':
  sys.exit(main())
