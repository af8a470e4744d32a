"""Reads TensorBoard event files with tensorboardX's protocol buffers and CRC
code: a reader independent of ssl_jax.metric_writers, which writes them."""

import struct

from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c


def read_tensorboard_events(data: bytes):
  """(events, number of bad CRCs) of a TensorBoard event file's bytes."""
  events, bad, pos = [], 0, 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack('<Q', header)
    (header_crc,) = struct.unpack('<I', data[pos + 8:pos + 12])
    record = data[pos + 12:pos + 12 + length]
    (record_crc,) = struct.unpack('<I', data[pos + 12 + length:pos + 16 + length])
    bad += (header_crc != masked_crc32c(header)) + (record_crc != masked_crc32c(record))
    events.append(event_pb2.Event.FromString(record))
    pos += 16 + length
  return events, bad
