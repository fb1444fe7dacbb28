"""Shared test helpers, imported as `tests.helpers.<module>` (tests/ is a package; pytest puts the
repository root on sys.path, subprocess scripts run as `python -m tests.<dir>.<script>`):

attention_packs   fwd_bwd / rel_err of the attention tests; the random packs (re-exported from
                  unimedvl_jax/kernels/random_packs.py, shared with the benchmarks)
attention_rule    SPEC section 3's attention rule read literally (plain python)
model_packs       a hand-rolled packer of whole batches for the model / train / interop tests
infer_ref         a tiny random model and the full-recompute reference of the inference tests
interop           the interop tests' tiny config, all-random model, bit-exact comparison
torch_flux_vae    PyTorch transcription of FLUX's autoencoder (encoder / decoder)
bagel_torch_ref   PyTorch reference of BAGEL's module tree and packed forward
scale_configs     the small training config of the tests/scale/ subprocess checks
libtpu            where the AOT tests find libtpu (not a test requirement), else a skip
"""
