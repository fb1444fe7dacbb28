"""Constants shared by the generator's modules: names, splits, groups and their task types."""

from __future__ import annotations

from unimedvl_jax.data import truth
from unimedvl_jax.data.plans import IMAGE_PLACEHOLDER

GENERATOR = 'unimedvl_jax.data.synthetic'   # the manifest's `generator`: marks our datasets
GENERATOR_VERSION = '1'
DATASET_NAME = 'unimedvl-synthetic'
REAL_DATASET_NAME = 'unimedvl-real-samples'
SPLITS = ('train', 'val', 'test')
GROUPS = ('vqa', 'report', 'caption', 't2i', 'edit')
EDIT_TASKS = ('segmentation', 'super_resolution', 'modality_translation', 'virtual_staining',
              'counterfactual')
GROUP_TASKS = {
    'vqa': ('understanding', 'vqa'),
    'report': ('understanding', 'report_generation'),
    'caption': ('understanding', 'caption'),
    't2i': ('image_generation', 'text_to_image'),
    'edit': ('image_generation', None),   # sub_task_type: one of EDIT_TASKS
}
MODALITIES = truth.MODALITIES
VQA_SUFFIX = 'Answer the question using a single word or phrase.'


def vqa_prompt(question: str, suffix: str = VQA_SUFFIX) -> str:
  """The VQA prompt as the datasets write it (the generator, the real samples and inference):
  `<image>\\n{question}\\n{suffix}` (a question's own placeholders kept; the suffix not
  repeated)."""
  p = question if IMAGE_PLACEHOLDER in question else f'{IMAGE_PLACEHOLDER}\n{question}'
  return f'{p}\n{suffix}' if suffix and suffix not in p else p


def img_entry(rel: str, h: int, w: int) -> dict:
  """One `input_img` / `output_img` entry of a record (path relative to the data root)."""
  return {'path': rel, 'height': int(h), 'width': int(w)}
