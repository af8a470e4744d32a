"""Hypothesis strategies for the inputs of self-supervised losses.

Every strategy draws a few discrete choices (shape, scale, dtype, kind) and one
integer seed, and builds the arrays with NumPy from that seed. Two reasons:
drawing every float through Hypothesis is slow and shrinks towards all-zero
arrays that no network produces, and a *small fixed set of shapes* lets a
property test compile each loss once per shape instead of once per example
(a compile costs ~0.1-1 s on CPU, an execution microseconds).

Conventions shared with `ssl_jax.testing.properties`:
  * axis 0 of every per-example array is the batch (it is what gets permuted
    and split over devices); shared arrays (a queue, prototypes) come last;
  * all arrays of one draw have the same feature dimension.

Kinds of embeddings (`kinds=`):
  'gaussian'        i.i.d. normal rows: the generic case;
  'duplicated'      about half of the rows are copies of other rows (repeated
                    images in a batch; ties in any argmax/sort);
  'constant_rows'   every row is c_i * (1, ..., 1): all rows on one line, so
                    normalised rows are +-the same vector;
  'near_collinear'  rows are one direction plus 1e-3 relative noise: the
                    almost-collapsed regime where cosines approach 1 and
                    softmaxes saturate.
"""

from typing import Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

KINDS = ('gaussian', 'duplicated', 'constant_rows', 'near_collinear')
BATCH_SIZES = (8, 16)
DIMS = (3, 16)
SCALES = (1e-3, 1.0, 1e3)
DTYPES = ('float32',)

# Seeds of the NumPy generators that build the arrays (public so that a
# custom input builder can draw its own extra arrays the same way).
SEEDS = st.integers(min_value=0, max_value=2**31 - 1)


def make_embeddings(rng: np.random.Generator, batch: int, dim: int,
                    kind: str = 'gaussian', scale: float = 1.0) -> np.ndarray:
  """Builds one [batch, dim] float64 array of the given kind (see module doc).

  Args:
    rng: the NumPy generator to draw from.
    batch: number of rows.
    dim: number of features.
    kind: one of KINDS.
    scale: every entry is multiplied by it.

  Returns:
    A float64 array; strategies cast it to the drawn dtype.
  """
  if kind == 'gaussian':
    x = rng.normal(size=(batch, dim))
  elif kind == 'duplicated':
    x = rng.normal(size=(batch, dim))
    copies = rng.choice(batch, size=batch // 2, replace=False)
    # Sources outside `copies`, so that a row is never "copied" onto itself.
    sources = np.setdiff1d(np.arange(batch), copies)
    x[copies] = x[rng.choice(sources, size=len(copies))]
  elif kind == 'constant_rows':
    # Magnitudes kept away from 0 so that "constant" does not become "zero".
    c = rng.uniform(0.5, 2.0, size=(batch, 1)) * rng.choice([-1.0, 1.0], (batch, 1))
    x = np.repeat(c, dim, axis=1)
  elif kind == 'near_collinear':
    direction = rng.normal(size=(1, dim))
    x = direction + 1e-3 * np.linalg.norm(direction) * rng.normal(size=(batch, dim))
  else:
    raise ValueError(f'Unknown kind {kind!r}. Known kinds: {", ".join(KINDS)}.')
  return x * scale


@st.composite
def embeddings(draw, *, batch_sizes: Sequence[int] = BATCH_SIZES,
               dims: Sequence[int] = DIMS, scales: Sequence[float] = SCALES,
               dtypes: Sequence[str] = DTYPES,
               kinds: Sequence[str] = KINDS) -> np.ndarray:
  """One [batch, dim] array of embeddings.

  Args:
    draw: supplied by Hypothesis.
    batch_sizes, dims, scales, dtypes, kinds: the choices to draw from; keep
      the shape lists short, every distinct shape is a compile.

  Returns:
    A NumPy array of the drawn dtype ('float32', 'bfloat16', 'float16').
  """
  batch, dim = draw(st.sampled_from(batch_sizes)), draw(st.sampled_from(dims))
  x = make_embeddings(np.random.default_rng(draw(SEEDS)), batch, dim,
                      draw(st.sampled_from(kinds)), draw(st.sampled_from(scales)))
  return _cast(x, draw(st.sampled_from(dtypes)))


@st.composite
def views(draw, num_views: int = 2, *, shared_rows: Sequence[int] = (),
          batch_sizes: Sequence[int] = BATCH_SIZES, dims: Sequence[int] = DIMS,
          scales: Sequence[float] = SCALES, dtypes: Sequence[str] = DTYPES,
          kinds: Sequence[str] = KINDS,
          view_noise: Sequence[float] = (0.0, 0.1, 1.0)) -> Tuple[np.ndarray, ...]:
  """Several views of one batch of images, plus optional shared arrays.

  Each view is the same base embedding (of a drawn kind) plus its own noise
  of relative size `view_noise` (0: identical views, the aligned optimum of a
  contrastive loss; 1: views as different as two images).

  Args:
    draw: supplied by Hypothesis.
    num_views: number of [batch, dim] views returned first.
    shared_rows: for each entry k, one more [k, dim] array of independent
      Gaussian rows (a negative queue, a memory bank, prototypes) that is not
      part of the batch.
    batch_sizes, dims, scales, dtypes, kinds: as in `embeddings`.
    view_noise: relative per-view noise levels to draw from.

  Returns:
    A tuple of `num_views + len(shared_rows)` arrays of one dtype.
  """
  batch, dim = draw(st.sampled_from(batch_sizes)), draw(st.sampled_from(dims))
  kind, scale = draw(st.sampled_from(kinds)), draw(st.sampled_from(scales))
  noise, dtype = draw(st.sampled_from(view_noise)), draw(st.sampled_from(dtypes))
  rng = np.random.default_rng(draw(SEEDS))
  base = make_embeddings(rng, batch, dim, kind, 1.0)
  row_norm = np.linalg.norm(base, axis=1, keepdims=True)
  out = [(base + noise * row_norm / np.sqrt(dim) * rng.normal(size=base.shape)) * scale
         for _ in range(num_views)]
  out += [make_embeddings(rng, k, dim, 'gaussian', scale) for k in shared_rows]
  return tuple(_cast(x, dtype) for x in out)


def view_pairs(**kwargs) -> st.SearchStrategy:
  """Two views of one batch, `(z1, z2)`; keyword arguments as in `views`."""
  return views(2, **kwargs)


@st.composite
def multi_crop(draw, num_global: int = 2, num_local: int = 4, *,
               shared_rows: Sequence[int] = (),
               batch_sizes: Sequence[int] = BATCH_SIZES,
               dims: Sequence[int] = DIMS, scales: Sequence[float] = SCALES,
               dtypes: Sequence[str] = DTYPES, kinds: Sequence[str] = KINDS,
               stacked: bool = False) -> Tuple[np.ndarray, ...]:
  """Embeddings of multi-crop views (SwAV, DINO): global crops, then local.

  Local crops see less of the image, so they get more noise (relative 1.0)
  than global crops (relative 0.3).

  Args:
    draw: supplied by Hypothesis.
    num_global: number of global crops.
    num_local: number of local crops.
    shared_rows: as in `views` (prototypes, a queue), appended last.
    batch_sizes, dims, scales, dtypes, kinds: as in `embeddings`.
    stacked: return the crops as one [crops, batch, dim] array, the layout
      of the library's SwAV and DINO losses (batch on axis 1: give the loss's
      LossCase `batch_axes=(1, ...)`), instead of one [batch, dim] array per
      crop.

  Returns:
    The crops (a tuple of arrays, or a 1-tuple with the stack), then the
    shared arrays.
  """
  batch, dim = draw(st.sampled_from(batch_sizes)), draw(st.sampled_from(dims))
  kind, scale = draw(st.sampled_from(kinds)), draw(st.sampled_from(scales))
  dtype = draw(st.sampled_from(dtypes))
  rng = np.random.default_rng(draw(SEEDS))
  base = make_embeddings(rng, batch, dim, kind, 1.0)
  row_norm = np.linalg.norm(base, axis=1, keepdims=True) / np.sqrt(dim)
  crops = [(base + level * row_norm * rng.normal(size=base.shape)) * scale
           for level in [0.3] * num_global + [1.0] * num_local]
  crops = [np.stack(crops)] if stacked else crops
  crops += [make_embeddings(rng, k, dim, 'gaussian', scale) for k in shared_rows]
  return tuple(_cast(c, dtype) for c in crops)


def _cast(x: np.ndarray, dtype: Optional[str]) -> np.ndarray:
  # jnp.dtype knows 'bfloat16' (from ml_dtypes), which NumPy alone does not.
  return x.astype(jnp.dtype(dtype or 'float32'))
