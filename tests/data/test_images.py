"""Image readers, resize rules, pixel transforms (data/images.py).

Real files: pydicom's own test files, pydicom-data's, nibabel's test NIfTI; all offline.
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
from PIL import Image

from unimedvl_jax.data import images as I


def _pydicom_file(name):
  import pydicom.data
  p = os.path.join(os.path.dirname(pydicom.data.__file__), 'test_files', name)
  if not os.path.isfile(p):
    pytest.skip(f'pydicom test file {name} not installed')
  return p


def _store_file(name):
  try:
    import data_store
  except ImportError:
    pytest.skip('pydicom-data not installed')
  p = os.path.join(os.path.dirname(data_store.__file__), 'data', name)
  if not os.path.isfile(p):
    pytest.skip(f'pydicom-data file {name} not installed')
  return p


def _nib_file(name):
  import nibabel
  p = os.path.join(os.path.dirname(nibabel.__file__), 'tests', 'data', name)
  if not os.path.isfile(p):
    pytest.skip(f'nibabel test file {name} not installed')
  return p


def _check_rgb(a, shape=None):
  assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
  if shape is not None:
    assert a.shape[:2] == shape


# ------------------------------------------------------------------------------------------------
# PIL formats

def test_png_rgb_grey_rgba_palette(tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)
  Image.fromarray(rgb).save(tmp_path / 'a.png')
  np.testing.assert_array_equal(I.load_image(tmp_path / 'a.png'), rgb)
  g = rgb[..., 0]
  Image.fromarray(g).save(tmp_path / 'g.png')
  out = I.load_image(tmp_path / 'g.png')
  _check_rgb(out, (13, 17))
  for k in range(3):
    np.testing.assert_array_equal(out[..., k], g)
  rgba = np.concatenate([rgb, np.full((13, 17, 1), 7, np.uint8)], -1)
  Image.fromarray(rgba).save(tmp_path / 'a4.png')
  np.testing.assert_array_equal(I.load_image(tmp_path / 'a4.png'), rgb)
  Image.fromarray(rgb).convert('P').save(tmp_path / 'p.png')
  _check_rgb(I.load_image(tmp_path / 'p.png'), (13, 17))
  Image.fromarray(rgb).save(tmp_path / 'b.bmp')
  np.testing.assert_array_equal(I.load_image(tmp_path / 'b.bmp'), rgb)
  Image.fromarray(rgb).save(tmp_path / 't.tif')
  np.testing.assert_array_equal(I.load_image(tmp_path / 't.tif'), rgb)


def test_jpeg(tmp_path):
  yy, xx = np.mgrid[0:32, 0:48]
  rgb = np.stack([yy * 8, xx * 5, (yy + xx) * 3], -1).astype(np.uint8)
  Image.fromarray(rgb).save(tmp_path / 'a.jpg', quality=95)
  out = I.load_image(tmp_path / 'a.jpg')
  _check_rgb(out, (32, 48))
  assert np.abs(out.astype(int) - rgb).mean() < 3


def test_16bit_png_scaled(tmp_path):
  ramp = (np.arange(64 * 32).reshape(32, 64) * 31 + 500).astype(np.uint16)
  Image.fromarray(ramp).save(tmp_path / 'g16.png')
  assert Image.open(tmp_path / 'g16.png').mode in ('I;16', 'I')
  out = I.load_image(tmp_path / 'g16.png')
  _check_rgb(out, (32, 64))
  ref = np.round((ramp - ramp.min()) / (ramp.max() - ramp.min()) * 255).astype(np.uint8)
  np.testing.assert_array_equal(out[..., 0], ref)
  assert out.min() == 0 and out.max() == 255


def test_extension_does_not_matter(tmp_path):
  rgb = np.full((4, 5, 3), 9, np.uint8)
  Image.fromarray(rgb).save(tmp_path / 'x.png')
  os.rename(tmp_path / 'x.png', tmp_path / 'x.dat')
  np.testing.assert_array_equal(I.load_image(tmp_path / 'x.dat'), rgb)


# ------------------------------------------------------------------------------------------------
# DICOM

def test_dicom_ct_rescale_and_default_soft_tissue_window():
  import pydicom
  p = _pydicom_file('CT_small.dcm')
  ds = pydicom.dcmread(p)
  assert 'WindowCenter' not in ds and float(ds.RescaleIntercept) != 0
  hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
  out = I.load_image(p)
  _check_rgb(out, (128, 128))
  np.testing.assert_array_equal(out[..., 0], I.apply_window(hu, 40, 400))
  np.testing.assert_array_equal(out[..., 1], out[..., 0])
  # An explicit window (tuple or preset name) overrides the default.
  np.testing.assert_array_equal(I.load_image(p, window='bone')[..., 0], I.apply_window(hu, 400, 1800))
  np.testing.assert_array_equal(I.load_image(p, window=(0, 2000))[..., 0], I.apply_window(hu, 0, 2000))


def test_dicom_mr_uses_file_window():
  import pydicom
  p = _pydicom_file('MR_small.dcm')
  ds = pydicom.dcmread(p)
  c, w = float(ds.WindowCenter), float(ds.WindowWidth)
  out = I.load_image(p)
  _check_rgb(out, (64, 64))
  np.testing.assert_array_equal(out[..., 0], I.apply_window(ds.pixel_array, c, w))
  # The same image in other transfer syntaxes decodes identically.
  for other in ('MR_small_bigendian.dcm', 'MR_small_RLE.dcm', 'MR_small_implicit.dcm'):
    np.testing.assert_array_equal(I.load_image(_pydicom_file(other)), out)


def test_dicom_cr_monochrome1_inverted():
  import pydicom
  p = _store_file('RG3_UNCR.dcm')
  ds = pydicom.dcmread(p)
  assert ds.PhotometricInterpretation == 'MONOCHROME1' and ds.Modality == 'CR'
  c = float(ds.WindowCenter[0] if ds['WindowCenter'].VM > 1 else ds.WindowCenter)
  w = float(ds.WindowWidth[0] if ds['WindowWidth'].VM > 1 else ds.WindowWidth)
  out = I.load_image(p)
  _check_rgb(out, (ds.Rows, ds.Columns))
  np.testing.assert_array_equal(out[..., 0], 255 - I.apply_window(ds.pixel_array, c, w))


def test_dicom_ultrasound_rgb_palette_ybr():
  import pydicom
  p = _store_file('US1_UNCR.dcm')
  ds = pydicom.dcmread(p)
  np.testing.assert_array_equal(I.load_image(p), ds.pixel_array)
  pal = I.load_image(_pydicom_file('examples_palette.dcm'))
  _check_rgb(pal, (350, 800))
  assert not np.array_equal(pal[..., 0], pal[..., 2])   # really coloured through the palette
  # YBR_FULL stored pixels come back as (nearly) the same RGB as the RGB original.
  rgb = I.load_image(_store_file('SC_rgb.dcm')).astype(int)
  ybr = I.load_image(_store_file('SC_ybr_full_uncompressed.dcm')).astype(int)
  assert np.abs(rgb - ybr).max() <= 8 and np.abs(rgb - ybr).mean() < 1   # converted, not raw YBR


def test_dicom_multiframe_frames():
  p = _store_file('emri_small.dcm')   # MR head, 10 frames
  import pydicom
  arr = pydicom.dcmread(p).pixel_array
  assert arr.shape[0] == 10
  mid = I.load_image(p)
  np.testing.assert_array_equal(mid, I.load_image(p, frame=5))
  np.testing.assert_array_equal(mid[..., 0], I.percentile_window(arr[5]))
  assert not np.array_equal(I.load_image(p, frame=0), mid)
  with pytest.raises(I.ImageError) as e:
    I.load_image(p, frame=10)
  assert e.value.reason == 'undecodable_image' and 'frame 10' in str(e.value)


def test_dicom_jpeg2000_decodes_like_uncompressed():
  a = I.load_image(_store_file('693_UNCI.dcm'))
  b = I.load_image(_pydicom_file('693_J2KI.dcm'))
  _check_rgb(a, (512, 512))
  assert np.abs(a.astype(int) - b.astype(int)).mean() < 2


def test_dicom_tags():
  t = I.dicom_tags(_store_file('RG3_UNCR.dcm'))
  assert t['Modality'] == 'CR' and t['BodyPartExamined'] == 'EXTREMITY'


# ------------------------------------------------------------------------------------------------
# NIfTI

def test_nifti_middle_axial_slice_radiological():
  import nibabel as nib
  p = _nib_file('anatomical.nii')
  img = nib.as_closest_canonical(nib.load(p))
  data = np.asanyarray(img.dataobj).astype(np.float64)
  k = data.shape[2] // 2
  out = I.load_image(p)
  sl = data[:, :, k]
  _check_rgb(out, (sl.shape[1], sl.shape[0]))
  np.testing.assert_array_equal(out[..., 0], I.percentile_window(sl[::-1, ::-1].T))
  other = I.load_image(p, slice_index=3)
  np.testing.assert_array_equal(other[..., 0], I.percentile_window(data[:, :, 3][::-1, ::-1].T))
  with pytest.raises(I.ImageError) as e:
    I.load_image(p, slice_index=data.shape[2])
  assert e.value.reason == 'undecodable_image'


def test_nifti_4d_gz_takes_volume_zero():
  import nibabel as nib
  p = _nib_file('example4d.nii.gz')
  img = nib.as_closest_canonical(nib.load(p))
  data = np.asanyarray(img.dataobj)
  assert data.ndim == 4
  vol = data[..., 0].astype(np.float64)
  out = I.load_image(p)
  k = vol.shape[2] // 2
  np.testing.assert_array_equal(out[..., 0], I.percentile_window(vol[:, :, k][::-1, ::-1].T))


def test_nifti_written_here(tmp_path):
  import nibabel as nib
  vol = np.zeros((20, 30, 5), np.float32)
  vol[2:5, 20:25, 2] = 100.0   # RAS+: low x = patient left, high y = anterior; slice 2
  nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / 'v.nii.gz'))
  out = I.load_image(tmp_path / 'v.nii.gz', slice_index=2)
  _check_rgb(out, (30, 20))
  rows, cols = np.nonzero(out[..., 0] > 128)
  # Radiological view: anterior at the top, patient left on the viewer's right:
  # x = 2..4 -> columns 15..17 (of 20), y = 20..24 -> rows 5..9 (of 30).
  assert set(cols) == {15, 16, 17} and set(rows) == {5, 6, 7, 8, 9}


# ------------------------------------------------------------------------------------------------
# Errors

def test_missing_file(tmp_path):
  for name in ('nope.png', 'nope.dcm', 'nope.nii.gz'):
    with pytest.raises(I.ImageError) as e:
      I.load_image(tmp_path / name)
    assert e.value.reason == 'missing_file' and e.value.path.endswith(name)
    assert name in str(e.value) and 'missing_file' in str(e.value)


def test_truncated_png(tmp_path):
  rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  Image.fromarray(rgb).save(tmp_path / 'a.png')
  data = (tmp_path / 'a.png').read_bytes()
  (tmp_path / 'cut.png').write_bytes(data[:len(data) // 2])
  with pytest.raises(I.ImageError) as e:
    I.load_image(tmp_path / 'cut.png')
  assert e.value.reason == 'undecodable_image' and 'cut.png' in str(e.value)


def test_garbage_files(tmp_path):
  (tmp_path / 'g.dcm').write_bytes(bytes(range(256)) * 3)
  (tmp_path / 'g.png').write_bytes(b'not an image at all')
  (tmp_path / 'g.nii.gz').write_bytes(gzip.compress(b'\x00' * 100))
  for name in ('g.dcm', 'g.png', 'g.nii.gz'):
    with pytest.raises(I.ImageError) as e:
      I.load_image(tmp_path / name)
    assert e.value.reason == 'undecodable_image', (name, e.value)
    assert name in str(e.value)


def test_truncated_dicom_pixels():
  with pytest.raises(I.ImageError) as e:
    I.load_image(_pydicom_file('MR_truncated.dcm'))
  assert e.value.reason == 'undecodable_image'


def test_unsupported_dicom():
  # JPEG-LS has no decoder here (no pylibjpeg / gdcm): unsupported, and the message says why.
  with pytest.raises(I.ImageError) as e:
    I.load_image(_pydicom_file('MR_small_jpeg_ls_lossless.dcm'))
  assert e.value.reason == 'unsupported_dicom'
  assert 'JPEG-LS' in str(e.value) and 'MR_small_jpeg_ls_lossless.dcm' in str(e.value)
  # A DICOM without pixel data (structured report).
  with pytest.raises(I.ImageError) as e:
    I.load_image(_pydicom_file('test-SR.dcm'))
  assert e.value.reason == 'unsupported_dicom'


def test_image_error_reason_validated():
  with pytest.raises(ValueError):
    I.ImageError('bad_reason', 'x')


# ------------------------------------------------------------------------------------------------
# Resize rules and transforms

VIT = dict(max_size=980, min_size=378, stride=14, max_pixels=2007040)
VAE = dict(max_size=1024, min_size=512, stride=16)


@pytest.mark.parametrize('hw,rule,expected', [
    ((512, 512), VAE, (512, 512)),
    ((2048, 1024), VAE, (1024, 512)),           # long side capped
    ((100, 200), VAE, (512, 1024)),             # short side raised to min
    ((64, 64), VAE, (512, 512)),
    ((100, 1000), VIT, (98, 980)),              # long-side limit wins over min short side
    ((2000, 1000), VIT, (980, 490)),
    ((1000, 1000), VIT, (980, 980)),
    ((64, 64), dict(max_size=64, min_size=32, stride=16), (64, 64)),
    ((32, 32), dict(max_size=64, min_size=32, stride=16), (32, 32)),
    ((1000, 1000), dict(max_size=2000, min_size=0, stride=10, max_pixels=10000), (100, 100)),
    ((5, 5), dict(max_size=8, min_size=0, stride=16), (16, 16)),   # never below stride
])
def test_target_size_table(hw, rule, expected):
  assert I.target_size(*hw, **rule) == expected


def test_target_size_invariants():
  rng = np.random.default_rng(0)
  for _ in range(400):
    h, w = (int(v) for v in rng.integers(1, 4000, 2))
    for rule in (VIT, VAE, dict(max_size=100, min_size=50, stride=8, max_pixels=6000)):
      h2, w2 = I.target_size(h, w, **rule)
      s = rule['stride']
      assert h2 % s == 0 and w2 % s == 0 and h2 >= s and w2 >= s
      assert max(h2, w2) <= max(s, rule['max_size'])
      if rule.get('max_pixels'):
        assert h2 * w2 <= max(rule['max_pixels'], s * s)
      # aspect ratio preserved up to rounding
      if min(h2, w2) > 2 * s and min(h, w) > 10:
        assert abs(np.log((h2 / w2) / (h / w))) < 0.35


def test_resize_bicubic_antialiased():
  check = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
  img = np.repeat(check[..., None], 3, -1)
  out = I.resize(img, (16, 16))
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  assert np.abs(out.astype(int) - 127.5).max() <= 3   # antialiased: the checkerboard averages out
  ref = np.asarray(Image.fromarray(img).resize((16, 16), Image.BICUBIC, reducing_gap=None))
  np.testing.assert_array_equal(out, ref)
  assert I.resize(img, (64, 64)) is not img and np.array_equal(I.resize(img, (64, 64)), img)
  up = I.resize(img[:8, :12], (16, 24))
  assert up.shape == (16, 24, 3)


def test_unit_range():
  x = np.array([[[0, 255, 127]]], np.uint8)
  y = I.to_unit_range(x)
  assert y.dtype == np.float32
  np.testing.assert_allclose(y, [[[-1.0, 1.0, 127 / 127.5 - 1.0]]], atol=1e-6)
  np.testing.assert_array_equal(I.from_unit_range(y), x)


def test_vit_patchify_order_against_loops():
  H, W, p = 6, 9, 3
  img = np.arange(H * W * 3, dtype=np.float32).reshape(H, W, 3)
  patches, nh, nw = I.vit_patchify(img, p)
  assert (nh, nw) == (2, 3) and patches.shape == (6, 27)
  for pr in range(nh):
    for pc in range(nw):
      ref = []
      for r in range(p):
        for c in range(p):
          for ch in range(3):          # channel fastest
            ref.append(img[pr * p + r, pc * p + c, ch])
      np.testing.assert_array_equal(patches[pr * nw + pc], ref)
  with pytest.raises(ValueError):
    I.vit_patchify(img[:5], p)
