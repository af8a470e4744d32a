"""Jigsaw tiling on the device: cut a crop into a grid of jittered tiles, shuffle.

The standard jigsaw setup (Noroozi & Favaro 2016, used by PIRL): a crop is
divided into a 3x3 grid of cells and one tile, smaller than its cell, is cut
at a random position inside each cell (the jitter keeps the network from
matching tiles by their continuous edges); the tiles are then put in a random
order. Pure JAX with one key per example, so it runs inside the pmapped step
and any jigsaw pretext task can share it.
"""

from typing import Tuple

import jax
import jax.numpy as jnp


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
