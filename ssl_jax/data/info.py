"""What a method may know about its training data, and nothing more."""

import dataclasses
from typing import Any, Tuple


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """The facts about a dataset that methods read.

  Methods get this, never a `Source`: they size memory banks and pseudo-label
  tables by `num_examples`, normalise with `mean`/`std`, and build sample
  inputs with `image_shape`; reading examples is the training loop's job.

  Attributes:
    num_examples: examples in the training split.
    image_shape: (height, width, channels) as stored.
    num_classes: labelled classes (0 if unlabelled).
    mean: per-channel mean used to normalise views.
    std: per-channel standard deviation.
  """
  num_examples: int
  image_shape: Tuple[int, int, int]
  num_classes: int
  mean: Tuple[float, ...]
  std: Tuple[float, ...]

  @classmethod
  def of(cls, source: Any) -> 'DataInfo':
    """The DataInfo of a `data.Source` (or anything with its attributes)."""
    return cls(num_examples=len(source),
               image_shape=tuple(source.image_shape),
               num_classes=int(source.num_classes),
               mean=tuple(float(m) for m in source.mean),
               std=tuple(float(s) for s in source.std))
