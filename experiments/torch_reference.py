"""The PyTorch peer of `experiments/benchmark.py`: SimCLR and BYOL train steps.

Benchmark-only (torch is in experiments/requirements-benchmark.txt, never a
library dependency). The model, batch, views and loss match ssl_jax's: a
CIFAR-stem ResNet (3x3/1 stem conv, no max-pool, BasicBlocks, zero-initialised
last BN scale per block), an MLP projector (Linear-BN-ReLU-Linear), SimCLR's
NT-Xent over the 2B views, and BYOL's predictor, EMA target and symmetric
2 - 2cos loss. The views arrive already augmented (solo-learn augments in
DataLoader workers), so the timed step is forward + backward + update only,
while ssl_jax's timed step also augments on device, runs the online probe and
the collapse monitors: the comparison leans towards the peer.
SGD with momentum stands in for LARS (the per-layer trust ratio is a few norms
per parameter, negligible next to the convolutions).
"""

import copy
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn
import torch.nn.functional as F


class BasicBlock(nn.Module):

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    nn.init.zeros_(self.bn2.weight)
    self.shortcut = nn.Sequential()
    if stride != 1 or cin != cout:
      self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                    nn.BatchNorm2d(cout))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + self.shortcut(x))


class CifarResNet(nn.Module):
  """ResNet-18/34 with the CIFAR stem; returns globally averaged features."""

  def __init__(self, stage_sizes: Sequence[int], width: int = 64,
               channels: int = 3):
    super().__init__()
    self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1, bias=False),
                              nn.BatchNorm2d(width), nn.ReLU())
    blocks, cin = [], width
    for i, n in enumerate(stage_sizes):
      for j in range(n):
        cout = width * 2**i
        blocks.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
        cin = cout
    self.blocks = nn.Sequential(*blocks)
    self.out_dim = cin

  def forward(self, x):
    return self.blocks(self.stem(x)).mean(dim=(2, 3))


def mlp(cin: int, hidden: Sequence[int], cout: int) -> nn.Module:
  layers: List[nn.Module] = []
  for h in hidden:
    layers += [nn.Linear(cin, h), nn.BatchNorm1d(h), nn.ReLU()]
    cin = h
  layers.append(nn.Linear(cin, cout))
  return nn.Sequential(*layers)


BACKBONE_STAGES = {'resnet18': (2, 2, 2, 2), 'resnet34': (3, 4, 6, 3)}


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float):
  z = F.normalize(torch.cat([z1, z2]), dim=1)
  n = z1.shape[0]
  logits = (z @ z.t()) / temperature
  logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool), float('-inf'))
  targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
  # Summed over the two views of an image, as ssl_jax and the official code.
  return 2 * F.cross_entropy(logits, targets)


def byol_loss(p: torch.Tensor, z: torch.Tensor):
  return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()


class Step:
  """One method's train step on fixed, pre-augmented views."""

  def __init__(self, method: str, backbone: str, projector: Dict,
               predictor: Dict, temperature: float, channels_last: bool):
    self.method, self.temperature = method, temperature
    encoder = CifarResNet(BACKBONE_STAGES[backbone])
    head = mlp(encoder.out_dim, projector['hidden_dims'], projector['output_dim'])
    self.online = nn.Sequential(encoder, head)
    modules = [self.online]
    if method == 'byol':
      self.predictor = mlp(projector['output_dim'], predictor['hidden_dims'],
                           predictor['output_dim'])
      self.target = copy.deepcopy(self.online)
      for p in self.target.parameters():
        p.requires_grad_(False)
      modules += [self.predictor, self.target]
    elif method != 'simclr':
      raise ValueError(f'No PyTorch reference for {method!r}; known: simclr, byol.')
    self.memory_format = (torch.channels_last if channels_last
                          else torch.contiguous_format)
    for m in modules:
      m.to(memory_format=self.memory_format).train()
    params = list(self.online.parameters())
    if method == 'byol':
      params += list(self.predictor.parameters())
    self.optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9,
                                     weight_decay=1e-6)

  def __call__(self, v1: torch.Tensor, v2: torch.Tensor) -> float:
    v1 = v1.contiguous(memory_format=self.memory_format)
    v2 = v2.contiguous(memory_format=self.memory_format)
    self.optimizer.zero_grad(set_to_none=True)
    if self.method == 'simclr':
      # Both views in one forward pass, as SimCLR's global BN sees 2B images.
      z = self.online(torch.cat([v1, v2]))
      loss = nt_xent(*z.chunk(2), self.temperature)
    else:
      p1, p2 = self.predictor(self.online(v1)), self.predictor(self.online(v2))
      with torch.no_grad():
        t1, t2 = self.target(v1), self.target(v2)
      loss = byol_loss(p1, t2) + byol_loss(p2, t1)
    loss.backward()
    self.optimizer.step()
    if self.method == 'byol':
      with torch.no_grad():
        for t, o in zip(self.target.parameters(), self.online.parameters()):
          t.mul_(0.996).add_(o, alpha=0.004)
    return float(loss)


def make_step(method: str, backbone: str, batch_size: int, image_size: int,
              projector: Dict, predictor: Dict, temperature: float,
              channels_last: bool = False, threads: int = 0
              ) -> Tuple[Callable[[], float], Dict]:
  """A zero-argument callable that runs one train step and returns its seconds.

  The views are random, fixed and pre-augmented; the first call includes
  PyTorch's one-off costs, so time the calls after a warm-up.
  """
  if threads:
    torch.set_num_threads(threads)
  torch.manual_seed(0)
  step = Step(method, backbone, projector, predictor, temperature, channels_last)
  v1 = torch.randn(batch_size, 3, image_size, image_size)
  v2 = torch.randn(batch_size, 3, image_size, image_size)

  def timed_step() -> float:
    t0 = time.perf_counter()
    step(v1, v2)  # float(loss) inside waits for the step to finish
    return time.perf_counter() - t0

  return timed_step, {'torch': torch.__version__,
                      'torch_threads': torch.get_num_threads(),
                      'channels_last': channels_last}
