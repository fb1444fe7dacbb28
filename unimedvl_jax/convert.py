"""Convert between the PyTorch BAGEL / UniMedVL checkpoint layout and our Orbax checkpoints.

    # PyTorch dir (ema.safetensors, ae.safetensors, llm_config.json, vit_config.json) -> Orbax
    python -m unimedvl_jax.convert import --torch-dir DIR --out CKPT [--config configs/x.py]
        [--set model.dtype=float32 ...] [--dtype bf16|fp32] [--vit-layers N] [--shard]

    # Orbax -> PyTorch dir (exactly the reference key set) [+ a transformers causal LM of the
    # understanding expert]
    python -m unimedvl_jax.convert export --checkpoint CKPT --out DIR [--dtype bf16|fp32]
        [--no-ema] [--hf-llm-out DIR2] [--tokenizer-dir TOK]

Strict both ways: a missing, unexpected or mis-shaped key is an error that lists them. The import
prints what it derived and decided (e.g. the ViT depth) and writes CKPT/import_report.json.
Library form: unimedvl_jax.interop.{import_torch,export_torch}.
"""

from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m unimedvl_jax.convert', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest='cmd', required=True)
  i = sub.add_parser('import', help='PyTorch dir -> Orbax checkpoint')
  i.add_argument('--torch-dir', required=True)
  i.add_argument('--out', required=True, help='checkpoint directory to create')
  i.add_argument('--config', default=None,
                 help='config file for the data/train/mesh sections (model is derived)')
  i.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='override a field of --config (repeatable)')
  i.add_argument('--dtype', default=None, choices=['bf16', 'fp32', 'fp16'],
                 help='cast every tensor (default: keep the file dtype)')
  i.add_argument('--vit-layers', type=int, default=None,
                 help='build only the first N ViT layers (default: all layers in the file)')
  i.add_argument('--shard', action='store_true', help='place tensors on the config mesh')
  i.add_argument('--step', type=int, default=0)
  e = sub.add_parser('export', help='Orbax checkpoint -> PyTorch dir')
  e.add_argument('--checkpoint', required=True)
  e.add_argument('--out', required=True)
  e.add_argument('--dtype', default=None, choices=['bf16', 'fp32', 'fp16'],
                 help='cast every tensor (default: keep the checkpoint dtype)')
  e.add_argument('--ema', default=True, action=argparse.BooleanOptionalAction,
                 help='export the EMA weights (default) or, with --no-ema, the raw params')
  e.add_argument('--step', type=int, default=None)
  e.add_argument('--hf-llm-out', default=None,
                 help='also write the understanding expert as a transformers causal LM here')
  e.add_argument('--tokenizer-dir', default=None,
                 help='tokenizer files to copy (default: CKPT/tokenizer when present)')
  return p


def main(argv=None) -> int:
  """Returns 0 on success, 2 when the conversion is refused (the error lists what is wrong)."""
  from unimedvl_jax.interop.import_torch import TorchImportError
  from unimedvl_jax.interop.keymap import KeyMapError, KeySetError
  args = _parser().parse_args(argv)
  try:
    return _run(args)
  except (KeySetError, KeyMapError, TorchImportError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2


def _run(args) -> int:
  if args.cmd == 'import':
    from unimedvl_jax.interop.import_torch import import_checkpoint
    cfg, report = import_checkpoint(args.torch_dir, args.out, config_path=args.config,
                                    overrides=args.set, dtype=args.dtype,
                                    vit_layers=args.vit_layers, shard=args.shard, step=args.step)
    for n in report.notes:
      print(f'note: {n}')
    print(json.dumps({'out': args.out, 'param_dtype': report.param_dtype,
                      'tensors': report.num_tensors, 'ignored_keys': len(report.ignored_keys),
                      'model': cfg.model.to_dict()}, default=str, indent=1))
    return 0
  from unimedvl_jax.interop.export_torch import export_checkpoint
  info = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, use_ema=args.ema,
                           hf_llm_out=args.hf_llm_out, tokenizer_dir=args.tokenizer_dir,
                           step=args.step)
  print(json.dumps({'out': args.out, **info}, default=str, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main())
