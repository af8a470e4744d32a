"""Jigsaw tiling on the device: cut a crop into a grid of jittered tiles, shuffle.

The standard jigsaw setup (Noroozi & Favaro 2016, used by PIRL): a crop is
divided into a 3x3 grid of cells and one tile, smaller than its cell, is cut
at a random position inside each cell (the jitter keeps the network from
matching tiles by their continuous edges); the tiles are then put in a random
order. Pure JAX with one key per example, so it runs inside the pmapped step
and any jigsaw pretext task can share it.

The Jigsaw pretext task itself does not use all 9! orders but a fixed set of
permutations far apart in Hamming distance (`permutation_set`, computed once
in NumPy), and classifies which one was applied (`jigsaw_from_set`).
"""

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np


def tile_grid(rng: jax.Array, image: jax.Array, *, grid: int = 3,
              tile_size: int) -> jax.Array:
  """The grid*grid tiles of one image in raster order, each jittered in its cell.

  Args:
    rng: key of this image.
    image: [H, W, C]; cells are H // grid by W // grid (any remainder at the
      bottom/right is unused).
    grid: cells per side.
    tile_size: side of each tile, at most the cell side.

  Returns:
    [grid*grid, tile_size, tile_size, C] tiles.
  """
  h, w, c = image.shape
  cell_h, cell_w = h // grid, w // grid
  if tile_size > min(cell_h, cell_w):
    raise ValueError(f'A {tile_size}-pixel tile does not fit a {cell_h}x'
                     f'{cell_w} cell of a {h}x{w} image cut {grid}x{grid}; '
                     f'lower the tile size or enlarge the crop.')
  n = grid * grid
  ky, kx = jax.random.split(rng)
  dy = jax.random.randint(ky, (n,), 0, cell_h - tile_size + 1)
  dx = jax.random.randint(kx, (n,), 0, cell_w - tile_size + 1)
  rows = jnp.repeat(jnp.arange(grid), grid)
  cols = jnp.tile(jnp.arange(grid), grid)
  y0 = rows * cell_h + dy
  x0 = cols * cell_w + dx
  cut = lambda y, x: jax.lax.dynamic_slice(image, (y, x, 0),
                                           (tile_size, tile_size, c))
  return jax.vmap(cut)(y0, x0)


def jigsaw(rng: jax.Array, images: jax.Array, *, grid: int = 3,
           tile_size: int) -> Tuple[jax.Array, jax.Array]:
  """Tiles every image of a batch and shuffles its tiles.

  Args:
    rng: key for the batch; each example gets its own key from it.
    images: [B, H, W, C].
    grid: cells per side (3 for the 3x3 jigsaw).
    tile_size: side of each tile.

  Returns:
    (tiles [B, grid*grid, tile_size, tile_size, C], permutations [B, grid*grid]):
    tiles[b, j] is the raster-order tile permutations[b, j] of image b.
  """
  keys = jax.random.split(rng, images.shape[0])

  def one(key, image):
    tile_key, perm_key = jax.random.split(key)
    tiles = tile_grid(tile_key, image, grid=grid, tile_size=tile_size)
    perm = jax.random.permutation(perm_key, grid * grid)
    return tiles[perm], perm

  return jax.vmap(one)(keys, images)


# ---------------------------------------------------------------------------
# The Jigsaw task's fixed permutation set (Noroozi & Favaro 2016, sec. 3.3).


@functools.lru_cache(maxsize=2)
def _all_permutations(num_cells: int) -> Tuple[np.ndarray, np.ndarray]:
  """Every permutation, and has_value[i, v] = (permutation[i] == v) per row.

  With the second table the agreement of all n! permutations with one of
  them is a sum of num_cells precomputed boolean rows, ~50x faster than
  comparing the [n!, num_cells] array each time.
  """
  # Built by inserting the value k-1 at every position of the permutations
  # of range(k-1): vectorised, unlike a list of itertools tuples (3 s for 9!).
  perms = np.zeros((1, 0), np.int8)
  for k in range(1, num_cells + 1):
    m = len(perms)
    grown = np.empty((m * k, k), np.int8)
    for pos in range(k):
      block = grown[pos * m:(pos + 1) * m]
      block[:, :pos], block[:, pos], block[:, pos + 1:] = (
          perms[:, :pos], k - 1, perms[:, pos:])
    perms = grown
  has_value = perms.T[:, None, :] == np.arange(num_cells, dtype=np.int8)[None, :, None]
  return perms, has_value


@functools.lru_cache(maxsize=16)
def permutation_set(num_permutations: int, num_cells: int = 9,
                    seed: int = 0) -> np.ndarray:
  """A set of tile orders chosen greedily to be far apart in Hamming distance.

  Starting from one random permutation, each next one is the permutation of
  all num_cells! whose minimal Hamming distance to those already chosen is
  largest; ties go to a seeded random choice. A large minimal distance makes
  every pair of classes differ in many tile positions, which Noroozi & Favaro
  found to matter more than the number of classes (their algorithm 1 ranks
  candidates by the average distance; the minimum is what separates the
  closest pair, and is what this function guarantees and reports).

  Args:
    num_permutations: size of the set (100 in the paper's main setting; 1000
      for the larger one).
    num_cells: tiles per image (9 for 3x3).
    seed: seeds the first permutation and the tie-breaks, so the set is a
      pure function of the arguments.

  Returns:
    [num_permutations, num_cells] int32 array of distinct permutations (read
    only: it is cached).
  """
  candidates, has_value = _all_permutations(num_cells)
  if not 0 < num_permutations <= len(candidates):
    raise ValueError(f'Cannot choose {num_permutations} distinct orders of '
                     f'{num_cells} tiles (there are {len(candidates)}).')
  positions = np.arange(num_cells)

  def distances(pick):
    agree = has_value[positions, candidates[pick]].sum(axis=0, dtype=np.int8)
    return num_cells - agree

  rng = np.random.default_rng(seed)
  chosen = [int(rng.integers(len(candidates)))]
  min_distance = distances(chosen[0])
  for _ in range(num_permutations - 1):
    best = np.flatnonzero(min_distance == min_distance.max())
    pick = int(best[rng.integers(len(best))])
    chosen.append(pick)
    np.minimum(min_distance, distances(pick), out=min_distance)
  out = candidates[chosen].astype(np.int32)
  out.setflags(write=False)
  return out


def min_hamming_distance(permutations: np.ndarray) -> int:
  """Smallest number of positions in which two permutations of the set differ."""
  p = np.asarray(permutations)
  d = np.sum(p[:, None, :] != p[None, :, :], axis=-1)
  np.fill_diagonal(d, p.shape[1] + 1)
  return int(d.min())


def jigsaw_from_set(rng: jax.Array, images: jax.Array,
                    permutations: jax.Array, *, grid: int = 3,
                    tile_size: int) -> Tuple[jax.Array, jax.Array]:
  """Tiles every image and shuffles its tiles by a permutation of the set.

  Args:
    rng: key for the batch; each example gets its own key from it.
    images: [B, H, W, C].
    permutations: [P, grid*grid] the fixed set (`permutation_set`).
    grid: cells per side.
    tile_size: side of each tile.

  Returns:
    (tiles [B, grid*grid, tile_size, tile_size, C], labels [B] int32):
    tiles[b, j] is the raster-order tile permutations[labels[b], j] of image b.
  """
  permutations = jnp.asarray(permutations, jnp.int32)
  if permutations.shape[1] != grid * grid:
    raise ValueError(f'Permutations of {permutations.shape[1]} tiles for a '
                     f'{grid}x{grid} grid.')
  keys = jax.random.split(rng, images.shape[0])

  def one(key, image):
    tile_key, label_key = jax.random.split(key)
    tiles = tile_grid(tile_key, image, grid=grid, tile_size=tile_size)
    label = jax.random.randint(label_key, (), 0, permutations.shape[0])
    return tiles[permutations[label]], label

  return jax.vmap(one)(keys, images)
