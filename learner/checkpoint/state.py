"""Capture and restore the learner's whole training state, without pickle.

Data flow: training loop -> `Capturer.capture` (every tensor copied into a reused host
buffer) -> `Snapshot` (msgpack metadata + raw tensor bytes) -> background writer -> Redis
shards. Recovery runs the other way: chunks -> `Snapshot` -> `restore` into freshly built
networks and optimizer.

A consistent cut without the copy on the training thread (`background=True`): the capture
takes the metadata, RNG states and layout at once (microseconds), and a copy thread fills
the buffer while training goes on. The cut stays the state after the captured update
because nothing writes a captured tensor before the next optimizer step: every algorithm
moves its targets, schedulers and counters after its optimizer steps, and the forward and
backward passes only read parameters and write gradients (not captured). So a global
optimizer step pre-hook is the one fence: the first step after a background capture waits
for the copy, which by then has usually had a whole forward and backward pass to finish.
tests/unit/learner/test_checkpoint_state.py holds every algorithm to that, bit for bit.

What is captured: the algorithm's own training state (`Algorithm.state`,
learner/algorithms/base.py: for DQN and TD3 the online and target networks, optimizer
state and the learning-rate scheduler when there is one; the algorithm decides, this module
only stores its tensors and plain metadata), step/version counters, python,
numpy and torch RNG states, the resolved config, and the learner's replay sample-client
state (`sampler_state`: the generator that draws which shard serves each batch and the
batch count that anneals the importance exponent), so the next batch is drawn as it would
have been, and with `env.normalize_obs` the observation statistics (learner/obsnorm.py
`ObsNorm.state`: float64 bytes among the counters). Tensors travel as raw bytes named in
a layout (name, torch dtype, shape, offset), so any dtype (bf16 included) round-trips
exactly; everything else is msgpack. The algorithm's metadata sits at the top level of
the map beside this module's own keys (`ENVELOPE`), where format 1 always had it.

What is not here, on purpose: the replay side. Each shard's rate limiter (inserts and
samples counted against `samples_per_insert`), its tables, priorities and sampling RNG
live on the shard and resume through the shard's own snapshot (replay/snapshot.py), taken
on its own clock; a learner checkpoint only holds what the learner process owns.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from canopy.errors import ProtocolError
from canopy.learner.algorithms.base import Algorithm, TrainingState

FORMAT = 1
# The metadata keys this module owns; every other key is the algorithm's (`TrainingState.meta`).
ENVELOPE = ("format", "layout", "rng", "counters", "config")
RNG_PREFIX = "rng."  # tensor names this module owns; every other tensor is the algorithm's
MAX_META_BYTES = 16 << 20
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


def _done() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


@dataclass
class Snapshot:
    """One captured state: msgpack metadata plus a flat byte buffer the layout points into.

    `flat` may be a buffer owned by a Capturer and reused by a later capture: the writer
    must be done with it before the capturer hands it out again (see writer.py).
    """

    meta: dict[str, Any]
    flat: torch.Tensor  # uint8, host memory
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    copied: threading.Event = field(default_factory=_done)  # `flat` holds every tensor

    def wait_copied(self, timeout: float | None = None) -> bool:
        """Block until a background capture has filled `flat`; False when `timeout` came first."""
        return self.copied.wait(timeout)

    def meta_bytes(self) -> bytes:
        """The metadata as msgpack, chunk 0 of a stored checkpoint."""
        return msgpack.packb(self.meta, use_bin_type=True)

    @property
    def nbytes(self) -> int:
        """Size of the flat tensor buffer."""
        return int(self.flat.numel())

    @classmethod
    def from_bytes(cls, meta_bytes: bytes, flat: bytes | bytearray | memoryview) -> Snapshot:
        """Parse what `meta_bytes` and the flat buffer hold; raises ProtocolError on anything odd."""
        if len(meta_bytes) > MAX_META_BYTES:
            raise ProtocolError(f"checkpoint metadata is {len(meta_bytes)} bytes, limit {MAX_META_BYTES}")
        try:
            meta = msgpack.unpackb(meta_bytes, raw=False, strict_map_key=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise ProtocolError(f"checkpoint metadata is not msgpack: {exc}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ProtocolError(f"checkpoint metadata is not a map of format {FORMAT}")
        try:
            end = _layout_bytes(meta["layout"])
            step = int(meta["counters"].get("updates", 0))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise ProtocolError(f"checkpoint metadata is malformed: {type(exc).__name__} {exc}") from None
        if end != len(flat):
            raise ProtocolError(f"checkpoint layout covers {end} bytes, the data has {len(flat)}")
        buf = (
            torch.frombuffer(bytearray(flat), dtype=torch.uint8)
            if len(flat)
            else torch.empty(0, dtype=torch.uint8)
        )
        return cls(meta=meta, flat=buf, step=step)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The named tensors, as views into `flat` (clone before keeping them past a reuse)."""
        out = {}
        for name, dtype, shape, offset, nbytes in self.meta["layout"]:
            raw = self.flat[offset : offset + nbytes]
            out[name] = raw.view(_DTYPES[dtype]).reshape(shape)
        return out


def _layout_bytes(layout: list) -> int:
    """The bytes a layout covers; ProtocolError (or a type error for the caller) when odd."""
    end = 0
    for name, dtype, shape, offset, nbytes in layout:
        if dtype not in _DTYPES or offset != end or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ProtocolError(f"checkpoint layout entry {name!r} is inconsistent")
        want = math.prod(shape) * _DTYPES[dtype].itemsize  # Python ints: no silent overflow
        if want != nbytes:
            raise ProtocolError(f"checkpoint layout entry {name!r} holds {nbytes} bytes, shape says {want}")
        end += nbytes
    return end


def named_tensors(algo: Algorithm, state: TrainingState | None = None) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of the training state in a fixed order (the capture layout)."""
    state = algo.state() if state is None else state
    clash = [k for k in state.tensors if k.startswith(RNG_PREFIX)]
    if clash:
        raise ValueError(f"algorithm tensor names {clash[:3]} use the checkpoint's {RNG_PREFIX!r} prefix")
    items = list(state.tensors.items())
    items.append(("rng.torch", torch.get_rng_state()))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        items += [(f"rng.cuda.{i}", s) for i, s in enumerate(torch.cuda.get_rng_state_all())]
    return items


def _meta(
    state: TrainingState, counters: dict[str, Any], config: dict[str, Any], layout: list
) -> dict[str, Any]:
    clash = [k for k in state.meta if k in ENVELOPE]
    if clash:
        raise ValueError(f"algorithm metadata keys {clash} are the checkpoint's own")
    np_state = np.random.get_state(legacy=True)
    py_state = random.getstate()
    return {
        "format": FORMAT,
        "layout": layout,
        **state.meta,
        "rng": {
            "python": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy": [
                np_state[0],
                np_state[1].tobytes(),
                int(np_state[2]),
                int(np_state[3]),
                float(np_state[4]),
            ],
        },
        "counters": {"updates": state.updates, **counters},
        "config": config,
    }


class Capturer:
    """Copies the training state into one of two reused host buffers.

    Two buffers let the training thread capture while the writer still sends the previous
    snapshot; `busy` names the buffer the writer holds, which a capture never overwrites.
    Reusing buffers matters: touching 128 MB of fresh pages costs more than the copy itself.
    With `background=True` the copy runs on a thread of its own, fenced by the first
    optimizer step that follows (see the module docstring); `fences` counts those steps and
    `last_fence_wait_s` is how long the newest one waited: the part of a background capture
    the training thread pays, besides the call itself.

    Example:
        cap = Capturer(pin=torch.cuda.is_available())
        snap = cap.capture(algo, {"epoch": 3}, config_dict, background=True)
        writer.submit(snap, ...)  # the writer waits for snap.copied before sending
    """

    def __init__(self, pin: bool = False):
        self.pin = pin
        self.buffers: list[torch.Tensor | None] = [None, None]
        self.next = 0
        self.fences = 0
        self.last_fence_wait_s = 0.0
        self._pending: Snapshot | None = None
        self._hook: Any = None

    def capture(
        self,
        algo: Algorithm,
        counters: dict[str, Any],
        config: dict[str, Any],
        avoid: torch.Tensor | None = None,
        background: bool = False,
    ) -> Snapshot:
        """Copy the algorithm's state into a buffer other than `avoid` (the one the writer holds)."""
        self.fence()  # one copy in flight at a time: its buffer may be the one picked below
        state = algo.state()
        items = named_tensors(algo, state)
        layout, offset = [], 0
        for name, t in items:
            nbytes = t.numel() * t.element_size()
            layout.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), offset, nbytes])
            offset += nbytes
        slot = self.next
        if (
            avoid is not None
            and self.buffers[slot] is not None
            and self.buffers[slot].data_ptr() == avoid.data_ptr()
        ):
            slot = 1 - slot
        buf = self.buffers[slot]
        if buf is None or buf.numel() != offset:
            buf = torch.empty(offset, dtype=torch.uint8, pin_memory=self.pin)
            buf.fill_(0)  # fault the pages in now, not on the next capture's clock
            self.buffers[slot] = buf
        self.next = 1 - slot
        snap = Snapshot(meta=_meta(state, counters, config, layout), flat=buf, step=state.updates)
        copies = [
            (t.detach().reshape(-1), buf[off : off + n])
            for (_, t), (*_, off, n) in zip(items, layout, strict=True)
            if n
        ]
        if not background:
            _copy(copies)
            return snap
        if self._hook is None:
            self._hook = register_optimizer_step_pre_hook(self._before_step)
        snap.copied = threading.Event()
        self._pending = snap
        if any(src.is_cuda for src, _ in copies):
            # The copies must see what the training stream has queued up to this point.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
        else:
            side = None
        threading.Thread(
            target=_copy, args=(copies, snap.copied, side), name="ckpt-capture", daemon=True
        ).start()
        return snap

    def fence(self) -> None:
        """Wait until the background copy in flight (if any) has finished."""
        snap, self._pending = self._pending, None
        if snap is None:
            return
        t0 = time.monotonic()
        snap.copied.wait()
        self.fences += 1
        self.last_fence_wait_s = time.monotonic() - t0

    def _before_step(self, *_: Any) -> None:
        if self._pending is not None:
            self.fence()


def _copy(
    copies: list[tuple[torch.Tensor, torch.Tensor]],
    done: threading.Event | None = None,
    stream: Any = None,
) -> None:
    """Copy every (source, destination bytes) pair; set `done` once all of it landed."""
    try:
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            for src, dst in copies:
                dst.copy_(src.view(torch.uint8), non_blocking=src.is_cuda)
        if any(src.is_cuda for src, _ in copies):
            (stream or torch.cuda.current_stream()).synchronize()
    finally:
        if done is not None:
            done.set()


def sampler_state(sampler: Any) -> dict[str, Any]:
    """A replay SampleClient's state for the checkpoint counters (see the module docstring)."""
    # JSON, not msgpack: PCG64's state holds 128-bit integers.
    return {"rng": json.dumps(sampler.rng.bit_generator.state), "batches": sampler.batches}


def load_sampler_state(sampler: Any, state: Any) -> None:
    """Put `sampler_state` back into a SampleClient; raises ProtocolError on anything odd."""
    try:
        rng = json.loads(state["rng"])
        if rng["bit_generator"] != type(sampler.rng.bit_generator).__name__:
            raise ProtocolError(f"checkpoint sampler RNG is {rng['bit_generator']!r}")
        batches = int(state["batches"])
        if batches < 0:
            raise ValueError(f"negative batch count {batches}")
        sampler.rng.bit_generator.state = rng
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"checkpoint sampler state is malformed: {exc}") from None
    sampler.batches = batches


def restore(algo: Algorithm, snap: Snapshot) -> dict[str, Any]:
    """Load a snapshot into an algorithm built from the same config; returns its counters.

    Hands the algorithm its own tensors (copies, owned by it from now on) and metadata
    through `Algorithm.restore`, and sets every RNG back, so the next update is bit for bit
    the one the captured learner would have made.
    """
    tensors = snap.tensors()
    meta = snap.meta
    algo.restore(
        TrainingState(
            tensors={k: v.clone() for k, v in tensors.items() if not k.startswith(RNG_PREFIX)},
            meta={k: v for k, v in meta.items() if k not in ENVELOPE},
            updates=int(meta["counters"]["updates"]),
        )
    )
    py = meta["rng"]["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = meta["rng"]["numpy"]
    np.random.set_state((kind, np.frombuffer(keys, dtype=np.uint32).copy(), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"].clone())
    cuda = [tensors[f"rng.cuda.{i}"].clone() for i in range(64) if f"rng.cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return dict(meta["counters"])
