"""Convert between the PyTorch BAGEL / UniMedVL checkpoint layout and our Orbax checkpoints.

    # PyTorch dir (ema.safetensors or model.safetensors.index.json + shards, ae.safetensors,
    # llm_config.json, vit_config.json) -> Orbax; no config needed: the model comes from the files
    python -m unimedvl_jax.convert import --torch-dir DIR --out CKPT [--config configs/x.py]
        [--set data.seq_len=4096 ...] [--dtype bf16|fp32] [--vit-layers N] [--shard]
        [--vae AE] [--weights FILE] [--vae-norm-groups 32] [--vae-norm-eps 1e-6]
        [--vae-scale-factor 0.3611] [--vae-shift-factor 0.1159] [--allow-cast] [--allow-nonfinite]

    # Orbax -> PyTorch dir (exactly the reference key set; with --shard-size the model tensors as
    # model-0000k-of-0000n.safetensors + model.safetensors.index.json) [+ a transformers causal
    # LM of the understanding expert]
    python -m unimedvl_jax.convert export --checkpoint CKPT --out DIR [--dtype bf16|fp32]
        [--shard-size 5GB] [--no-ema] [--hf-llm-out DIR2] [--tokenizer-dir TOK] [--merge-lora]

Import: a lone ema.safetensors imports without a VAE (the generation adapters are kept beside the
model, see interop/import_torch.py); a lone ae.safetensors imports as a VAE checkpoint, which
`--vae` and `export` accept. The VAE values no tensor shape gives (GroupNorm groups / eps, latent
scale / shift) come from the flags, else from ae.safetensors' metadata (our exports), else the
released defaults; the import prints each value and its source. An export writes everything a
re-import needs (unimedvl_config.json, ae.safetensors metadata): `import` of it takes no flags.

Strict both ways: a missing, unexpected or mis-shaped key is an error that lists them. The import
prints what it derived and decided (e.g. the ViT depth) and writes CKPT/import_report.json.
Errors (a refused conversion, a malformed JSON or safetensors file) print one line naming the
file and exit with status 2. Library form: unimedvl_jax.interop.{import_torch,export_torch}.
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
  i.add_argument('--torch-dir', required=True,
                 help='the checkpoint folder (or one .safetensors / .index.json file in it)')
  i.add_argument('--out', required=True, help='checkpoint directory to create')
  i.add_argument('--config', default=None,
                 help='config file for the data/train/mesh sections (the model is derived); '
                      'default: DIR/unimedvl_config.json when present, else the defaults')
  i.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='override a config field (repeatable; works without --config)')
  i.add_argument('--dtype', default=None, choices=['bf16', 'fp32', 'fp16'],
                 help='cast every tensor (default: keep the file dtype)')
  i.add_argument('--vit-layers', type=int, default=None,
                 help='build only the first N ViT layers (default: all layers in the file)')
  i.add_argument('--shard', action='store_true', help='place tensors on the config mesh')
  i.add_argument('--step', type=int, default=0)
  i.add_argument('--vae', default=None, metavar='AE',
                 help='the VAE: an ae.safetensors, a folder with one, or a VAE checkpoint '
                      '(default: DIR/ae.safetensors when present)')
  i.add_argument('--weights', default=None,
                 help='the model file to read when DIR holds several (ema / model / index)')
  i.add_argument('--vae-norm-groups', type=int, default=None,
                 help='VAE GroupNorm groups (default: ae.safetensors metadata, else 32)')
  i.add_argument('--vae-norm-eps', type=float, default=None,
                 help='VAE GroupNorm epsilon (default: ae.safetensors metadata, else 1e-6)')
  i.add_argument('--vae-scale-factor', type=float, default=None,
                 help='latent scale factor (default: ae.safetensors metadata, else 0.3611)')
  i.add_argument('--vae-shift-factor', type=float, default=None,
                 help='latent shift factor (default: ae.safetensors metadata, else 0.1159)')
  i.add_argument('--allow-cast', action='store_true',
                 help='cast tensors whose dtype differs from the rest of their file')
  i.add_argument('--allow-nonfinite', action='store_true',
                 help='import tensors holding NaN / inf (they are listed either way)')
  e = sub.add_parser('export', help='Orbax checkpoint -> PyTorch dir')
  e.add_argument('--checkpoint', required=True)
  e.add_argument('--out', required=True)
  e.add_argument('--dtype', default=None, choices=['bf16', 'fp32', 'fp16'],
                 help='cast every tensor (default: keep the checkpoint dtype)')
  e.add_argument('--shard-size', default=None, metavar='SIZE',
                 help='write the model tensors as model-0000k-of-0000n.safetensors shards of at '
                      'most SIZE (5GB = 5e9 bytes, 5GiB = 2**30 * 5) + model.safetensors.index.json '
                      '(default: one ema.safetensors)')
  e.add_argument('--ema', default=True, action=argparse.BooleanOptionalAction,
                 help='export the EMA weights (default) or, with --no-ema, the raw params')
  e.add_argument('--step', type=int, default=None)
  e.add_argument('--hf-llm-out', default=None,
                 help='also write the understanding expert as a transformers causal LM here')
  e.add_argument('--tokenizer-dir', default=None,
                 help='tokenizer files to copy (default: CKPT/tokenizer when present)')
  e.add_argument('--merge-lora', action='store_true',
                 help='fold the LoRA adapters of a model.lora checkpoint into the base weights '
                      '(W + alpha/rank * A @ B) and export the merged model')
  return p


def _one_line(e: BaseException) -> str:
  msg = str(e)
  if isinstance(e, OSError) and e.filename:
    msg = f'{e.filename}: {e.strerror or e}'
  return msg


def main(argv=None) -> int:
  """Returns 0 on success, 2 when the conversion is refused (the error says what is wrong)."""
  from unimedvl_jax.config import ConfigError
  from unimedvl_jax.interop.import_common import TorchImportError
  from unimedvl_jax.interop.keymap import KeyMapError, KeySetError
  from unimedvl_jax.interop.st_io import CheckpointFormatError
  from unimedvl_jax.train.checkpoint_format import CheckpointError
  args = _parser().parse_args(argv)
  try:
    return _run(args)
  except (KeySetError, KeyMapError, TorchImportError, CheckpointFormatError, ConfigError,
          CheckpointError, OSError, ValueError) as e:
    print(f'error: {_one_line(e)}', file=sys.stderr)
    return 2


def _run(args) -> int:
  if args.cmd == 'import':
    from unimedvl_jax.interop.import_torch import import_checkpoint
    flags = {'norm_groups': args.vae_norm_groups, 'norm_eps': args.vae_norm_eps,
             'scale_factor': args.vae_scale_factor, 'shift_factor': args.vae_shift_factor}
    cfg, report = import_checkpoint(
        args.torch_dir, args.out, config_path=args.config, overrides=args.set, dtype=args.dtype,
        vit_layers=args.vit_layers, shard=args.shard, step=args.step, vae=args.vae,
        weights=args.weights, vae_flags=flags, allow_cast=args.allow_cast,
        allow_nonfinite=args.allow_nonfinite)
    for n in report.notes:
      print(f'note: {n}')
    model = cfg.model.to_dict() if report.kind == 'model' else cfg.to_dict()
    print(json.dumps({'out': args.out, 'kind': report.kind, 'param_dtype': report.param_dtype,
                      'tensors': report.num_tensors, 'ignored_keys': len(report.ignored_keys),
                      'vae_settings': report.vae_settings, 'adjusted': report.adjusted,
                      'model': model}, default=str, indent=1))
    return 0
  from unimedvl_jax.interop.export_torch import export_checkpoint
  info = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, use_ema=args.ema,
                           hf_llm_out=args.hf_llm_out, tokenizer_dir=args.tokenizer_dir,
                           step=args.step, shard_size=args.shard_size,
                           merge_lora=args.merge_lora)
  print(json.dumps({'out': args.out, **info}, default=str, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main())
