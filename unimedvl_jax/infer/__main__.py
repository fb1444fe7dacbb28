"""`python -m unimedvl_jax.infer vqa|report|generate|edit --checkpoint DIR ...` (see cli.py).

The CLI lives in the package (a module `unimedvl_jax/infer.py` cannot coexist with the
`unimedvl_jax/infer/` package: the package wins the import)."""

import sys

from absl import app, flags

from unimedvl_jax.infer import cli

if __name__ == '__main__':
  cli.define_flags()
  flags.mark_flag_as_required('checkpoint')
  app.run(lambda argv: sys.exit(cli.main(argv)))
