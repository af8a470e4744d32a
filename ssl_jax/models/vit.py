"""Vision Transformer backbones (Dosovitskiy et al. 2021) and patch masking.

`ViT(x, train)` returns `(features, aux)` like the ResNets: `features` is the
final-normed class token (or the mean of the patch tokens with `pool='mean'`,
data2vec's probe) and `aux` holds every block's token outputs
(`block1` ... `blockN`, [B, 1 + N_patches, D]) and the final-normed patch tokens
(`patch_tokens`).

The position embeddings are learned for a `pos_embed_size` x `pos_embed_size`
image and interpolated bicubically for other resolutions, as DINO does for its
96-pixel local crops. Masking is given per call: `mask` [B, N] replaces masked
patch tokens with a learned mask token (data2vec, BEiT), `keep_ids` [B, k]
keeps only the listed patch tokens (MAE-style token dropping); they are made by
the pure functions `random_patch_mask`, `block_patch_mask` (BEiT's block-wise
masking) and `random_keep_ids`.
"""

import functools
import math
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

VIT_SIZES = {
    'vit_tiny': dict(width=192, depth=12, num_heads=3),
    'vit_small': dict(width=384, depth=12, num_heads=6),
    'vit_base': dict(width=768, depth=12, num_heads=12),
    'vit_large': dict(width=1024, depth=24, num_heads=16),
}


def interpolate_pos_embed(pos_embed: jax.Array, grid: Tuple[int, int]
                          ) -> jax.Array:
  """Resizes patch position embeddings to another grid (DINO's recipe).

  Args:
    pos_embed: [1, 1 + g*g, D] embeddings of the class token and a square
      g x g grid of patches.
    grid: (rows, cols) of the patch grid of the current input.

  Returns:
    [1, 1 + rows*cols, D]; the class-token embedding is never resized, and at
    the training grid the input is returned unchanged (bit for bit).
  """
  cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
  n = patch_pos.shape[1]
  side = int(round(n ** 0.5))
  if side * side != n:
    raise ValueError(f'{n} patch position embeddings do not form a square grid.')
  if tuple(grid) == (side, side):
    return pos_embed
  d = patch_pos.shape[-1]
  patch_pos = patch_pos.reshape(1, side, side, d)
  patch_pos = jax.image.resize(patch_pos, (1, grid[0], grid[1], d),
                               method='bicubic', antialias=False)
  return jnp.concatenate(
      [cls_pos, patch_pos.reshape(1, grid[0] * grid[1], d).astype(pos_embed.dtype)],
      axis=1)


def random_patch_mask(rng: jax.Array, batch: int, num_patches: int,
                      num_masked: int) -> jax.Array:
  """A boolean mask [batch, num_patches] with exactly `num_masked` True per row.

  Each row is an independent uniform choice of `num_masked` positions (ranks
  of i.i.d. uniforms), so the count is exact, unlike Bernoulli masking.
  """
  if not 0 <= num_masked <= num_patches:
    raise ValueError(f'Cannot mask {num_masked} of {num_patches} patches.')
  noise = jax.random.uniform(rng, (batch, num_patches))
  ranks = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
  return ranks < num_masked


# BEiT's block-wise masking, 10 attempts per block (masking_generator.py).
BLOCK_MASK_ATTEMPTS = 10


def _block_attempt(carry, u, *, grid: int, min_block: int, log_lo: float,
                   log_hi: float):
  """One of `block_mask_from_uniforms`' attempts at adding a rectangle."""
  mask, delta, max_patches = carry
  rows = jnp.arange(grid)[:, None]
  cols = jnp.arange(grid)[None, :]
  area = min_block + (max_patches - min_block) * u[0]
  aspect = jnp.exp(log_lo + (log_hi - log_lo) * u[1])
  h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (w < grid) & (h < grid)
  # random.randint(0, n) is inclusive: n + 1 outcomes.
  top = jnp.minimum(jnp.floor(u[2] * (grid - h + 1)).astype(jnp.int32),
                    grid - h)
  left = jnp.minimum(jnp.floor(u[3] * (grid - w + 1)).astype(jnp.int32),
                     grid - w)
  box = ((rows >= top) & (rows < top + h) & (cols >= left) &
         (cols < left + w))
  new = jnp.sum(box & ~mask)
  take = fits & (delta == 0) & (new > 0) & (new <= max_patches)
  mask = jnp.where(take, mask | box, mask)
  return (mask, delta + jnp.where(take, new, 0), max_patches), None


def block_mask_from_uniforms(uniforms: jax.Array, grid: int, num_masked: int,
                             *, min_block: int = 16,
                             max_block: Optional[int] = None,
                             min_aspect: float = 0.3) -> jax.Array:
  """BEiT's block-wise mask [grid * grid] of one image, from its random draws.

  facebookresearch/data2vec_vision beit/masking_generator.py
  (`MaskingGenerator`, L29-L92): rectangles of `min_block` to `max_block`
  patches and aspect ratio in [min_aspect, 1 / min_aspect] are added, each
  from up to 10 attempts, while fewer than `num_masked` patches are masked
  and a rectangle still adds some; a rectangle is kept only if it adds at
  most the patches still missing. So at most `num_masked` are masked, and a
  little fewer when no attempt fits.

  Args:
    uniforms: [num_masked, 10, 4] draws in [0, 1): per block and attempt, the
      area, the log aspect ratio, the top and the left edge (in that order,
      as `random.uniform`/`random.randint` in the official code).
    grid: patches per side.
    num_masked: the patches to mask (`--num_mask_patches`).
    min_block, max_block: rectangle size bounds in patches
      (`--min_mask_patches_per_block`, `--max_mask_patches_per_block`; None:
      num_masked).
    min_aspect: the smallest aspect ratio (the largest is its inverse).

  Returns:
    bool [grid * grid], row-major like the patch tokens.
  """
  max_block = num_masked if max_block is None else max_block
  log_lo, log_hi = math.log(min_aspect), math.log(1.0 / min_aspect)
  attempt = functools.partial(_block_attempt, grid=grid, min_block=min_block,
                              log_lo=log_lo, log_hi=log_hi)

  def cond(state):
    i, _, count, stopped = state
    return (i < num_masked) & (count < num_masked) & ~stopped

  def body(state):
    i, mask, count, _ = state
    max_patches = jnp.minimum(num_masked - count, max_block)
    (mask, delta, _), _ = jax.lax.scan(attempt, (mask, 0, max_patches),
                                       uniforms[i])
    return i + 1, mask, count + delta, delta == 0

  start = (0, jnp.zeros((grid, grid), bool), 0, False)
  _, mask, _, _ = jax.lax.while_loop(cond, body, start)
  return mask.reshape(grid * grid)


def block_patch_mask(rng: jax.Array, batch: int, grid: int, num_masked: int,
                     *, min_block: int = 16, max_block: Optional[int] = None,
                     min_aspect: float = 0.3) -> jax.Array:
  """BEiT/data2vec block-wise masks [batch, grid * grid], one per image.

  See `block_mask_from_uniforms`; each image draws its own uniforms.
  """
  if not 0 <= num_masked <= grid * grid:
    raise ValueError(f'Cannot mask {num_masked} of {grid * grid} patches.')
  uniforms = jax.random.uniform(
      rng, (batch, max(num_masked, 1), BLOCK_MASK_ATTEMPTS, 4))
  return jax.vmap(lambda u: block_mask_from_uniforms(
      u, grid, num_masked, min_block=min_block, max_block=max_block,
      min_aspect=min_aspect))(uniforms)


def random_keep_ids(rng: jax.Array, batch: int, num_patches: int,
                    num_keep: int) -> jax.Array:
  """Indices [batch, num_keep] of a random subset of patches (sorted per row)."""
  if not 0 < num_keep <= num_patches:
    raise ValueError(f'Cannot keep {num_keep} of {num_patches} patches.')
  noise = jax.random.uniform(rng, (batch, num_patches))
  return jnp.sort(jnp.argsort(noise, axis=1)[:, :num_keep], axis=1)


def keep_tokens(tokens: jax.Array, keep_ids: jax.Array) -> jax.Array:
  """Gathers patch tokens [B, N, D] at `keep_ids` [B, k] -> [B, k, D]."""
  return jnp.take_along_axis(tokens, keep_ids[..., None], axis=1)


class MlpBlock(nn.Module):
  hidden_dim: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    x = nn.Dense(self.hidden_dim, dtype=self.dtype,
                 kernel_init=nn.initializers.truncated_normal(0.02))(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(d, dtype=self.dtype,
                    kernel_init=nn.initializers.truncated_normal(0.02))(x)


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x))."""
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        kernel_init=nn.initializers.truncated_normal(0.02))(y, y)
    x = x + y
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
    return x + MlpBlock(int(x.shape[-1] * self.mlp_ratio), self.dtype)(y)


class ViT(nn.Module):
  """A ViT encoder with class token and interpolated position embeddings.

  Attributes:
    width: token dimension D.
    depth: number of transformer blocks.
    num_heads: attention heads.
    patch_size: side of the square patches.
    pos_embed_size: image side the position embeddings are learned for.
    mlp_ratio: hidden width of the MLP blocks relative to D.
    pool: 'cls' (DINO) or 'mean' of the patch tokens (data2vec's probe).
    axis_name: unused (LayerNorm needs no cross-device statistics); kept for
      the common backbone interface.
    dtype: computation dtype (parameters stay float32).
  """
  width: int = 192
  depth: int = 12
  num_heads: int = 3
  patch_size: int = 16
  pos_embed_size: int = 224
  mlp_ratio: float = 4.0
  pool: str = 'cls'
  axis_name: Optional[str] = None
  dtype: Any = None

  @property
  def num_patches(self) -> int:
    return (self.pos_embed_size // self.patch_size) ** 2

  def patch_grid(self, image_size: int) -> int:
    return image_size // self.patch_size

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True,
               mask: Optional[jax.Array] = None,
               keep_ids: Optional[jax.Array] = None
               ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """Encodes images [B, H, W, C].

    Args:
      x: images; H and W multiples of `patch_size` (the remainder is cropped).
      train: unused (no dropout/BN); part of the backbone interface.
      mask: optional bool [B, N]: patch tokens replaced by the mask token.
      keep_ids: optional int [B, k]: only these patch tokens are encoded.

    Returns:
      (features [B, D] float32, aux dict of block outputs and patch tokens).
    """
    del train
    if self.pool not in ('cls', 'mean'):
      raise ValueError(f"Unknown pool {self.pool!r}; known: 'cls', 'mean'.")
    dtype = self.dtype or jnp.float32
    x = x.astype(dtype)
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID',
                dtype=self.dtype, name='patch_embed')(x)
    b, gh, gw, d = x.shape
    tokens = x.reshape(b, gh * gw, d)
    if mask is not None:
      mask_token = self.param('mask_token', nn.initializers.truncated_normal(0.02),
                              (1, 1, d))
      tokens = jnp.where(mask[..., None], mask_token.astype(dtype), tokens)
    elif self.is_initializing():
      # Created at init so that one parameter tree serves masked and plain calls.
      self.param('mask_token', nn.initializers.truncated_normal(0.02), (1, 1, d))
    cls = self.param('cls_token', nn.initializers.truncated_normal(0.02),
                     (1, 1, d))
    pos = self.param('pos_embed', nn.initializers.truncated_normal(0.02),
                     (1, 1 + self.num_patches, d))
    pos = interpolate_pos_embed(pos, (gh, gw)).astype(dtype)
    tokens = tokens + pos[:, 1:]
    if keep_ids is not None:
      tokens = keep_tokens(tokens, keep_ids)
    cls = jnp.broadcast_to(cls.astype(dtype) + pos[:, :1], (b, 1, d))
    x = jnp.concatenate([cls, tokens], axis=1)
    aux = {}
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_ratio, self.dtype,
                       name=f'block{i + 1}')(x)
      aux[f'block{i + 1}'] = x
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='norm')(x)
    aux['patch_tokens'] = x[:, 1:]
    if self.pool == 'cls':
      features = x[:, 0]
    else:
      features = jnp.mean(x[:, 1:], axis=1)
    return features.astype(jnp.float32), aux


def build_vit(name: str):
  """A backbone builder (cfg, axis_name, dtype) -> ViT for the registry."""
  size = VIT_SIZES[name]

  def build(cfg, axis_name, dtype):
    return ViT(width=size['width'], depth=cfg.get('vit_depth', 0) or size['depth'],
               num_heads=size['num_heads'], patch_size=cfg.get('patch_size', 16),
               pos_embed_size=cfg.get('pos_embed_size', 224),
               mlp_ratio=cfg.get('mlp_ratio', 4.0), pool=cfg.get('pool', 'cls'),
               axis_name=axis_name, dtype=dtype)

  return build
