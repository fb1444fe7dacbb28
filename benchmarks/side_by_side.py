"""Side-by-side train-step benchmark: several systems in separate processes, all alive at once,
stepped in turn (one at a time, so none competes with another for the 2 cores), ratio per round.

    python -m benchmarks.bench_train_step --side_by_side                 # the default line-up
    python -m benchmarks.side_by_side --contestant torch_qwen2:dtype=bf16 \\
        --contestant jax_minimal --contestant project_text --rounds 5 --json out.json

Contestants (NAME[:key=value,...]):
  torch_qwen2    transformers' Qwen2ForCausalLM train step (forward + backward + AdamW,
                 torch==2.13.0 CPU), text only; dtype=fp32 (default) | bf16 (autocast)
  jax_minimal    benchmarks/minimal_lm.py: a minimal pure-JAX dense LM (scan, optax AdamW, bf16
                 dots with f32 accumulation, head-major dense causal attention)
  project_text   this project's train step (train/step.py) on text only: configs/small.py's LLM
                 with the ViT and VAE disabled, each pack one causal text sample of T tokens
  project_full   the project's full small step (ViT + VAE size buckets + both experts) on real
                 packed batches of the embedded dataset; cache=1: from a latent cache instead of
                 pixels (the VAE out of the step)
  project_tiny   configs/tiny.py's step on real packed batches (cache=1 as above)
  baseline_*     the same project_* contestants run by the recorded baseline commit (before
                 this round's work; --baseline_commit) from a `git archive` copy of it
Common keys: dtype=bf16|fp32 (JAX contestants), xla=FLAGS (extra XLA_FLAGS, '+'-separated),
remat=none|full, attn=blocked|xla.

Every worker reports: its analytic model FLOPs per step (useful work: profiling.
model_flops_per_step with the batch's exact attention pairs, CE rows and VAE images; the same
formula for the LM contestants, minimal_lm.flops_per_step), real tokens per step, process peak
RSS, XLA's temporary memory, and a square-matmul peak of its own framework measured in the same
run (before and after; the higher is used). MFU = model FLOPs / step time / that peak; the
project and minimal-JAX MFUs are also given against the JAX bf16 peak. The ratio table is
tokens/s of each contestant over the reference contestant (--reference), per round.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE_COMMIT = '8e60223'   # the last commit before this round's lean-step work

DEFAULT_LINEUP = ('torch_qwen2:dtype=fp32', 'torch_qwen2:dtype=bf16', 'jax_minimal',
                  'project_text', 'project_full', 'project_full:cache=1', 'project_tiny:cache=1',
                  'baseline_text', 'baseline_full', 'baseline_tiny')


def parse_spec(spec: str) -> tuple[str, dict]:
  name, _, rest = spec.partition(':')
  kw = {}
  for part in filter(None, rest.split(',')):
    k, _, v = part.partition('=')
    kw[k] = v
  return name, kw


# ------------------------------------------------------------------------------ worker side

def _rss_peak() -> int:
  import resource
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _jax_peak(dtype='bfloat16', n=2048):
  import jax.numpy as jnp
  from unimedvl_jax import profiling
  return profiling.measure_matmul_peak(jnp.dtype(dtype), n=n, iters=3)


def build_torch(kw):
  import numpy as np
  import torch
  from transformers import Qwen2Config, Qwen2ForCausalLM
  from benchmarks import minimal_lm
  d = minimal_lm.Dims()
  torch.manual_seed(0)
  cfg = Qwen2Config(vocab_size=d.vocab, hidden_size=d.hidden, intermediate_size=d.intermediate,
                    num_hidden_layers=d.layers, num_attention_heads=d.heads,
                    num_key_value_heads=d.kv_heads, head_dim=d.head_dim,
                    max_position_embeddings=d.seq, rope_theta=d.rope_theta, rms_norm_eps=d.eps,
                    tie_word_embeddings=False, attn_implementation='sdpa')
  model = Qwen2ForCausalLM(cfg).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-15,
                          weight_decay=0.0)
  rng = np.random.default_rng(0)
  ids = torch.from_numpy(rng.integers(0, d.vocab, (d.batch, d.seq)).astype(np.int64))
  bf16 = kw.get('dtype', 'fp32') == 'bf16'

  def step():
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
      loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)

  def peak():
    n = 2048
    dt = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.ones(n, n, dtype=dt), torch.ones(n, n, dtype=dt)
    torch.mm(a, b)
    best = float('inf')
    for _ in range(3):
      t0 = time.perf_counter()
      torch.mm(a, b)
      best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best

  info = dict(model_flops=minimal_lm.flops_per_step(d), tokens=d.batch * d.seq,
              framework=f'torch {torch.__version__} ({torch.get_num_threads()} threads)',
              dtype='bf16 autocast' if bf16 else 'fp32', peak_dtype='bf16' if bf16 else 'fp32')
  return step, peak, info


def build_minimal(kw):
  import jax
  from benchmarks import minimal_lm
  d = minimal_lm.Dims()
  dtype = {'bf16': 'bfloat16', 'fp32': 'float32'}[kw.get('dtype', 'bf16')]
  step_fn, state, batch = minimal_lm.build(d, dtype)
  box = [state]

  def step():
    box[0], loss = step_fn(box[0], batch)
    return float(jax.block_until_ready(loss))

  info = dict(model_flops=minimal_lm.flops_per_step(d), tokens=d.batch * d.seq,
              framework=f'jax {jax.__version__}', dtype=dtype,
              peak_dtype='bf16' if dtype == 'bfloat16' else 'fp32')
  return step, (lambda: _jax_peak(dtype)), info


def _text_batches(cfg, n):
  import numpy as np
  from unimedvl_jax.data import packing, plans
  geom = plans.Geometry.from_config(cfg)
  sp = plans.Specials(1, 2, 3, 4)
  out = []
  for i in range(n):
    rng = np.random.default_rng(i)
    rows = [[plans.tokenize([plans.PlanItem('text', loss=True, ids=rng.integers(
        10, cfg.model.llm.vocab_size, cfg.data.seq_len - 2))], sp, geom)]
            for _ in range(cfg.data.batch_size)]
    out.append(packing.assemble(rows, geom))
  return out


def pipeline_batches(cfg, n, data_dir):
  """(n real packed batches of the embedded dataset at cfg's image size, the data root)."""
  from unimedvl_jax.data import pipeline, synthetic
  size = int(cfg.data.vae_max_size)
  root = synthetic.ensure_dataset(os.path.join(data_dir, f'synthetic-s0-{size}-n64'), seed=0,
                                  size=size, n_subjects=64)
  cfg = cfg.copy_and_resolve_references()
  cfg.data.root = root
  cfg.data.num_workers = 0
  it = pipeline.make_train_iterator(cfg)
  try:
    return [next(it) for _ in range(n)], root
  finally:
    if hasattr(it, 'close'):
      it.close()


def build_project(kind, kw, data_dir, legacy=False):
  """project_text / project_full / project_tiny with this tree's code (or, legacy=True, the
  baseline commit's code: only the interfaces both share are used)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from unimedvl_jax import profiling, sharding
  from unimedvl_jax.batch import batch_spec
  from unimedvl_jax.config import stage_train_config
  from unimedvl_jax.config_load import load_config_file
  from unimedvl_jax.train import step as step_lib
  config = 'tiny' if kind == 'tiny' else 'small'
  dtype = {'bf16': 'bfloat16', 'fp32': 'float32'}[kw.get('dtype', 'fp32' if config == 'tiny'
                                                         else 'bf16')]
  ov = [f'model.dtype={dtype}', f"model.remat={kw.get('remat', 'none')}"]
  if 'attn' in kw:
    ov.append(f"model.attention_impl={kw['attn']}")
  if kind == 'text':
    ov += ['model.vit.enabled=False', 'model.vae.enabled=False', 'data.max_latent_tokens=0',
           'data.max_vit_patches=0', 'data.max_vae_images=0']
    if not legacy:
      ov.append('data.max_label_tokens=1024')
  # the baseline runs with its own configs (its tree is the worker's cwd)
  cfg_root = os.getcwd() if legacy else ROOT
  cfg = load_config_file(os.path.join(cfg_root, 'configs', f'{config}.py'), ov)
  if not legacy:
    cfg.data.latent_cache = ''     # pixels unless cache=1 (configs/tiny.py's 'auto' is the loop's)
  n = 3
  if kind == 'text':
    batches = _text_batches(cfg, n)      # the baseline's packer has the same interface
  else:
    batches, root = pipeline_batches(cfg, n, data_dir)
    if kw.get('cache') == '1':
      if legacy:
        raise ValueError('the baseline has no latent cache')
      batches = _cached(cfg, root, data_dir, batches)
      cfg.data.latent_cache = os.path.join(data_dir, f'latent_cache_{config}')
  if legacy:
    flops = [profiling.model_flops_per_step(cfg, attn_pairs=profiling.allowed_pairs(b))['train']
             for b in batches]
  else:
    flops = [profiling.model_flops_per_step(cfg, batch=b)['train'] for b in batches]
  tokens = float(np.mean([np.sum(b['segment_ids'] > 0) for b in batches]))
  spec = batch_spec(cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  graphdef, abstract = step_lib.abstract_state(cfg)
  tc = stage_train_config(cfg, None)
  if legacy:    # the baseline's step takes the lr as an argument
    fn = step_lib.make_train_step(graphdef, cfg, tc)
    lr_args = (jnp.float32(1e-4),)
  else:         # the torch side's constant lr 1e-4
    fn = step_lib.make_train_step(graphdef, cfg, tc, schedule=optax.constant_schedule(1e-4))
    lr_args = ()
  jitted, st_sh, b_sh = step_lib.jit_train_step(fn, abstract, mesh, spec)
  b_abs = {k: jax.ShapeDtypeStruct(s, dt) for k, (s, dt) in spec.items()}
  t0 = time.perf_counter()
  compiled = jitted.lower(abstract, b_abs, *lr_args).compile()
  compile_s = time.perf_counter() - t0
  mem = profiling.compiled_memory(compiled)
  state = jax.jit(lambda: step_lib.init_state(cfg)[1], out_shardings=st_sh)()
  dev = [{k: jax.device_put(v, b_sh[k]) for k, v in b.items()} for b in batches]
  box = [state, 0]

  def step():
    b = dev[box[1] % len(dev)]
    box[1] += 1
    box[0], m = compiled(box[0], b, *lr_args)
    return float(jax.block_until_ready(m['loss']))

  if kw.get('flops') == '1' and not legacy:
    info_flops = compiled_flops(cfg, batches[0], stage_train_config(cfg, None), mesh, spec)
    info_flops['model_flops_of_that_batch'] = flops[0]
    info_flops['compiled_over_model_flops'] = info_flops['compiled_flops'] / flops[0]
  else:
    info_flops = {}
  info = dict(model_flops=float(np.mean(flops)), tokens=tokens, framework=f'jax {jax.__version__}',
              **info_flops,
              dtype=dtype, peak_dtype='bf16' if dtype == 'bfloat16' else 'fp32',
              compile_s=round(compile_s, 1), xla_temp_bytes=mem.get('temp_size_in_bytes'),
              config=config, overrides=ov, hlo_text=compiled.as_text())
  return step, (lambda: _jax_peak(dtype)), info


def compiled_flops(cfg, batch, tc, mesh, spec) -> dict:
  """XLA's count of what the step executes, for one batch: cost_analysis of the same step
  compiled with unrolled layers (a scanned body would be counted once), plus the iterations of
  the blocked attention's data-dependent loops beyond the one cost_analysis counts
  (kernels/blocked_xla.iteration_flops x (iterations - 1) per call, the iterations read from
  this batch's metadata). Assumes remat 'none' (remat recomputes the forward loop)."""
  import jax
  import numpy as np
  import optax
  from unimedvl_jax import profiling
  from unimedvl_jax.kernels import blocked_xla as bx
  from unimedvl_jax.model.attention import resolve_impl
  from unimedvl_jax.train import step as step_lib
  cu = cfg.copy_and_resolve_references()
  cu.model.scan_layers = False
  g, abstract = step_lib.abstract_state(cu)
  fn = step_lib.make_train_step(g, cu, tc, schedule=optax.constant_schedule(1e-4))
  jitted, _, _ = step_lib.jit_train_step(fn, abstract, mesh, spec)
  b_abs = {k: jax.ShapeDtypeStruct(s, dt) for k, (s, dt) in spec.items()}
  t0 = time.perf_counter()
  comp = jitted.lower(abstract, b_abs).compile()
  out = {'unrolled_compile_s': round(time.perf_counter() - t0, 1),
         'cost_analysis_flops': profiling.cost_analysis(comp)['flops']}
  extra = 0.0
  if resolve_impl(cfg.model.attention_impl) == 'blocked':
    m, blk = cfg.model, int(cfg.model.attention_block)
    llm = m.llm
    B, T = batch['segment_ids'].shape
    perm = np.concatenate([batch['und_idx'], batch['gen_idx']], axis=1)
    take = lambda a: np.take_along_axis(np.asarray(batch[a]), perm, 1)
    n_dec = bx.chunks(take('segment_ids'), take('split_ids'), take('split_modes'), perm,
                      block_q=blk, block_k=blk)
    it = bx.chunk_flops(B, T, llm.num_heads, llm.num_kv_heads, llm.head_dim, blk, blk)
    extra += llm.num_layers * (n_dec - 1) * (it['fwd'] + it['bwd'])
    out['attention_chunks'] = {'decoder': n_dec}
    if m.vit.enabled and batch['vit_patches'].shape[1] > 0:
      vseg = np.asarray(batch['vit_segment_ids'])
      n_vit = bx.chunks(vseg, np.zeros_like(vseg), np.ones_like(vseg))
      v = m.vit
      itv = bx.chunk_flops(B, vseg.shape[1], v.num_heads, v.num_heads,
                           v.hidden_size // v.num_heads)
      trains_vit = not profiling.vit_frozen(m, tc.freeze)
      extra += v.num_layers * (n_vit - 1) * (itv['fwd'] + (itv['bwd'] if trains_vit else 0.0))
      out['attention_chunks']['vit'] = n_vit
  out['loop_iterations_flops'] = extra
  out['compiled_flops'] = out['cost_analysis_flops'] + extra
  return out


def _cached(cfg, root, data_dir, batches):
  """The same samples' batches from a latent cache (written once per config)."""
  from flax import nnx
  from unimedvl_jax.data import latent_cache, pipeline
  from unimedvl_jax.model.unimedvl import UniMedVL
  out = os.path.join(data_dir, f'latent_cache_{cfg.name}')
  model = UniMedVL(cfg.model, rngs=nnx.Rngs(cfg.seed))
  fp = latent_cache.vae_fingerprint(nnx.state(model.vae, nnx.Param))
  c = cfg.copy_and_resolve_references()
  c.data.root = root
  try:
    latent_cache.LatentCache(out, root, c).check_vae(fp)
  except latent_cache.LatentCacheError:
    latent_cache.build(c, model, root, out, log=lambda *a: None)
  c.data.latent_cache = out
  c.data.num_workers = 0
  it = pipeline.make_train_iterator(c)
  try:
    return [next(it) for _ in range(len(batches))]
  finally:
    if hasattr(it, 'close'):
      it.close()


SCOPES = ('vit', 'vae', 'attention', 'lm_head_ce', 'optimizer', 'layers')


def scope_breakdown(trace_dir: str, hlo_text: str) -> dict:
  """Thread-summed op time of a jax.profiler trace by the model's named scopes (the op_name
  metadata of each executed HLO op: vit, vae, attention, lm_head_ce, optimizer, layers; the rest
  is 'other': embeddings, gathers of the packed batch, loss glue)."""
  import glob
  import re
  from jax.profiler import ProfileData
  files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True),
                 key=os.path.getmtime)
  names = {}
  pat = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"')
  for line in hlo_text.splitlines():
    m = pat.match(line)
    if m:
      names[m.group(1)] = m.group(2)
  agg: dict[str, float] = {}
  prof = ProfileData.from_file(files[-1])
  for plane in prof.planes:
    for line in plane.lines:
      if line.name == 'python':
        continue
      for ev in line.events:
        n = ev.name
        if n not in names or n.split('.')[0] in ('while', 'call', 'conditional', 'cond'):
          continue
        # scope names appear wrapped by the transformations: jvp(vit), transpose(jvp(vit))
        words = set(re.findall(r'[A-Za-z_]+', names[n]))
        cat = next((sc for sc in SCOPES if sc in words), 'other')
        agg[cat] = agg.get(cat, 0.0) + ev.duration_ns / 1e6
  total = sum(agg.values()) or 1.0
  return {k: {'ms': round(v, 1), 'frac': round(v / total, 3)}
          for k, v in sorted(agg.items(), key=lambda kv: -kv[1])}


def worker_main(name: str, kw: dict, data_dir: str):
  if name.startswith('torch'):
    step, peak, info = build_torch(kw)
  elif name == 'jax_minimal':
    step, peak, info = build_minimal(kw)
  elif name.startswith('project_') or name.startswith('baseline_'):
    step, peak, info = build_project(name.split('_', 1)[1], kw, data_dir,
                                     legacy=name.startswith('baseline_'))
  else:
    raise ValueError(f'unknown contestant {name!r}')
  t0 = time.perf_counter()
  step()                                    # warm-up (first execution)
  info['first_step_s'] = round(time.perf_counter() - t0, 2)
  peaks = [peak()]
  print('READY ' + json.dumps({k: v for k, v in info.items() if k != 'hlo_text'}), flush=True)
  for line in sys.stdin:
    cmd = line.split()
    if not cmd:
      continue
    if cmd[0] == 'STEP':
      times, cpu = [], []
      for _ in range(int(cmd[1])):
        t, c = time.perf_counter(), time.process_time()
        loss = step()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
      print('DONE ' + json.dumps({'times': times, 'cpu': cpu, 'loss': loss}), flush=True)
    elif cmd[0] == 'PROFILE':
      if 'hlo_text' not in info:
        print('DONE {}', flush=True)
        continue
      import jax
      d = tempfile.mkdtemp(prefix='unimedvl_sbs_prof_')
      jax.profiler.start_trace(d)
      step()
      jax.profiler.stop_trace()
      print('DONE ' + json.dumps({'breakdown': scope_breakdown(d, info['hlo_text'])}), flush=True)
    elif cmd[0] == 'PEAK':
      peaks.append(peak())
      print('DONE ' + json.dumps({'peak': max(peaks), 'rss_peak': _rss_peak()}), flush=True)
    elif cmd[0] == 'QUIT':
      return


# ------------------------------------------------------------------------------ coordinator

class Worker:

  def __init__(self, spec: str, data_dir: str, baseline_tree: str | None, timeout: float):
    self.spec = spec
    name, kw = parse_spec(spec)
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    env.pop('XLA_FLAGS', None)
    if kw.get('xla'):
      env['XLA_FLAGS'] = kw['xla'].replace('+', ' ')
    tree = baseline_tree if name.startswith('baseline_') else ROOT
    env['PYTHONPATH'] = tree + os.pathsep + env.get('PYTHONPATH', '')
    self.proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), '--worker', spec, '--data_dir', data_dir],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, cwd=tree, bufsize=1)
    self.timeout = timeout
    self.info = self._read('READY')

  def _read(self, tag):
    deadline = time.time() + self.timeout
    while True:
      r, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.time()))
      if not r:
        raise TimeoutError(f'{self.spec}: no {tag} within {self.timeout} s')
      line = self.proc.stdout.readline()
      if not line:
        err = self.proc.stderr.read()[-4000:]
        raise RuntimeError(f'{self.spec} exited:\n{err}')
      if line.startswith(tag + ' '):
        return json.loads(line[len(tag) + 1:])

  def call(self, cmd):
    self.proc.stdin.write(cmd + '\n')
    self.proc.stdin.flush()
    return self._read('DONE')

  def close(self):
    try:
      self.proc.stdin.write('QUIT\n')
      self.proc.stdin.flush()
      self.proc.wait(timeout=60)
    except Exception:  # noqa: BLE001
      self.proc.kill()


def baseline_tree(commit: str) -> str:
  out = os.path.join(tempfile.gettempdir(), f'unimedvl_baseline_{commit}')
  if not os.path.exists(os.path.join(out, 'unimedvl_jax')):
    os.makedirs(out, exist_ok=True)
    arch = subprocess.run(['git', '-C', ROOT, 'archive', commit], check=True,
                          capture_output=True).stdout
    subprocess.run(['tar', '-x', '-C', out], input=arch, check=True)
  return out


def run(specs, *, rounds: int, steps: int, reference: str | None, data_dir: str,
        baseline_commit: str, timeout: float, profile: bool = True, log=print) -> dict:
  tree = baseline_tree(baseline_commit) if any(s.startswith('baseline_') for s in specs) else None
  workers = []
  try:
    for s in specs:                         # built one at a time: compiles do not overlap
      t0 = time.perf_counter()
      workers.append(Worker(s, data_dir, tree, timeout))
      log(f'{s}: ready in {time.perf_counter() - t0:.0f} s {workers[-1].info}')
    res = {w.spec: {'info': w.info, 'times': [], 'cpu': []} for w in workers}
    for r in range(rounds):
      line = []
      for w in workers:
        out = w.call(f'STEP {steps}')
        res[w.spec]['times'].append(statistics.median(out['times']))
        res[w.spec]['cpu'].append(statistics.median(out['cpu']))
        res[w.spec]['loss'] = out['loss']
        line.append(f'{w.spec} {res[w.spec]["times"][-1]:.3f}s')
      log(f'round {r}: ' + ', '.join(line) + f'  load {os.getloadavg()[0]:.2f}')
    if profile:
      for w in workers:
        res[w.spec]['breakdown'] = w.call('PROFILE').get('breakdown')
    for w in workers:
      out = w.call('PEAK')
      res[w.spec]['peak_flops'] = out['peak']
      res[w.spec]['rss_peak_bytes'] = out['rss_peak']
  finally:
    for w in workers:
      w.close()
  ref = reference or specs[0]
  jax_bf16 = max((v['peak_flops'] for k, v in res.items()
                  if v['info'].get('framework', '').startswith('jax') and
                  v['info'].get('peak_dtype') == 'bf16'), default=None)
  for k, v in res.items():
    i = v['info']
    v['step_s_median'] = statistics.median(v['times'])
    v['tokens_per_s'] = i['tokens'] / v['step_s_median']
    v['model_tflops_per_s'] = i['model_flops'] / v['step_s_median'] / 1e12
    v['mfu'] = i['model_flops'] / v['step_s_median'] / v['peak_flops']
    if jax_bf16:
      v['mfu_vs_jax_bf16_peak'] = i['model_flops'] / v['step_s_median'] / jax_bf16
    # ratio of tokens/s per round vs the reference (same round: same machine state)
    v['speedup_vs_reference_per_round'] = [
        (i['tokens'] / t) / (res[ref]['info']['tokens'] / tr)
        for t, tr in zip(v['times'], res[ref]['times'])]
    v['speedup_vs_reference_median'] = statistics.median(v['speedup_vs_reference_per_round'])
  return {'reference': ref, 'rounds': rounds, 'steps_per_round': steps,
          'machine': f'{os.cpu_count()} CPUs', 'baseline_commit': baseline_commit, 'results': res}


def table(out: dict) -> str:
  rows = ['| contestant | dtype | step s (median) | tokens/s | model GFLOP/step | MFU (own peak) | '
          f'x {out["reference"]} tokens/s (median of rounds) | peak RSS GiB |',
          '|---|---|---|---|---|---|---|---|']
  for k, v in out['results'].items():
    i = v['info']
    rows.append(f'| {k} | {i.get("dtype")} | {v["step_s_median"]:.3f} | {v["tokens_per_s"]:.0f} | '
                f'{i["model_flops"] / 1e9:.0f} | {v["mfu"]:.3f} | '
                f'{v["speedup_vs_reference_median"]:.2f} | {v["rss_peak_bytes"] / 2 ** 30:.2f} |')
  return '\n'.join(rows)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--worker', default=None, help=argparse.SUPPRESS)
  ap.add_argument('--contestant', action='append', default=None)
  ap.add_argument('--rounds', type=int, default=4)
  ap.add_argument('--steps', type=int, default=1, help='steps per contestant per round')
  ap.add_argument('--reference', default=None, help='contestant the ratios are against')
  ap.add_argument('--baseline_commit', default=BASELINE_COMMIT)
  ap.add_argument('--data_dir', default=os.path.join(tempfile.gettempdir(), 'unimedvl_bench'))
  ap.add_argument('--timeout', type=float, default=1800)
  ap.add_argument('--json', default=None)
  args = ap.parse_args(argv)
  if args.worker:
    name, kw = parse_spec(args.worker)
    return worker_main(name, kw, args.data_dir)
  specs = args.contestant or list(DEFAULT_LINEUP)
  out = run(specs, rounds=args.rounds, steps=args.steps, reference=args.reference,
            data_dir=args.data_dir, baseline_commit=args.baseline_commit, timeout=args.timeout)
  print(json.dumps(out, indent=1))
  print(table(out))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == '__main__':
  main()
