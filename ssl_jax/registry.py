"""Name -> object registries that fail with the list of known names."""

from typing import Callable, Dict, Generic, Iterator, TypeVar

T = TypeVar('T')


class Registry(Generic[T]):
  """A dict of named entries whose lookups fail loudly.

  A typo in a config (`resnet81`) should stop the run in its first second with
  the list of valid names, not after data loading and compilation.
  """

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: Dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator that registers `obj` under `name`."""

    def decorator(obj: T) -> T:
      if name in self._entries:
        raise ValueError(f'{self.kind} {name!r} is registered twice.')
      self._entries[name] = obj
      return obj

    return decorator

  def get(self, name: str) -> T:
    if name not in self._entries:
      raise ValueError(
          f'Unknown {self.kind} {name!r}. Known {self.kind}s: '
          f'{", ".join(sorted(self._entries))}.')
    return self._entries[name]

  def names(self) -> list:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())
