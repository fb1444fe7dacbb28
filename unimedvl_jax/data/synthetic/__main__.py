"""python -m unimedvl_jax.data.synthetic --out DIR [--seed 0] [--size 64] [--n-subjects 2400]"""

import sys

from unimedvl_jax.data.synthetic.cli import main

sys.exit(main())
