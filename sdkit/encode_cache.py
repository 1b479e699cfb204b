"""Cache of VAE encodings: a live stream re-sends the same picture while only the prompt,
strength or seed change, and a batch encodes its one picture once per image.

diffusers' img2img and inpaint pipelines (SD and SDXL) turn pixels into latents with
`retrieve_latents(vae.encode(x), generator)`: the encoder's posterior, then one draw from
it, `latent_dist.sample(generator)`, which takes the job's generator (per image with a
list of generators). What is cached is the posterior only, never a draw: the encoder and
`quant_conv` output (the `DiagonalGaussianDistribution` parameters, mean and log-variance).
On a hit the pipeline gets a fresh distribution built from an equal tensor (the same
chunk/clamp/exp on equal values: equal mean and std), draws from it with its own
generator in its own order, and scales it as always. Generator use, batch duplication,
SDXL's VAE upcast and the inpaint pipeline's two encodings (image and masked image) all
stay diffusers' own, so images are bit-identical to plain diffusers
(tests/test_encode_cache.py checks img2img, batches, new seeds, both inpaint UNets, SDXL).

The key is everything the posterior depends on: the input's bytes (blake2b), shape, dtype
and device; the VAE object, its encoder weights' storages and in-place version counters
(so `load_state_dict`, `.to()` or a fused adapter miss) and their dtype; the VAE's
slicing and tiling settings (both change the encoding); torch's thread count (CPU kernels
may split sums by it). A VAE upcast per job (SDXL in fp16) makes new weight storages each
time, so it may simply miss. Only diffusers' `AutoencoderKL` is served; other VAE classes
run uncached (not proven here).

Whole pictures only: the encoder is not local (its mid-block attention sees the whole
image), so a posterior assembled from cached tiles would differ. While a stroke changes
pixels every frame, every frame misses; it pays when the picture is re-sent unchanged.

`scope(engine, pipe)` wraps `pipe.vae.encode` only while a job's pipeline call runs (with
a count, for engines sharing one VAE) and finds the cache through a ContextVar, so other
threads, user code and copies of the VAE outside a job see diffusers' own method.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextvars import ContextVar
from typing import Any

import torch

_ACTIVE: ContextVar[EncodeCache | None] = ContextVar("sdkit_encode_cache", default=None)
_INSTALL_LOCK = threading.Lock()
_INSTALLED: dict[int, list[Any]] = {}  # id(vae) -> [scopes open, its own `encode` before]


class EncodeCache:
    """Least-recently-used posteriors, at most `size` (latent-sized: tens of KB each)."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self.enabled = True  # benchmarks/live.py --profile measures with and without
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[Hashable, tuple[torch.Tensor, bool]] = OrderedDict()
        self._lock = threading.Lock()

    def encode(self, vae: Any, original: Callable, x: torch.Tensor, return_dict: bool) -> Any:
        """`original(x, return_dict)`'s posterior, from the cache when the key matches."""
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        key = posterior_key(vae, x)
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                self.hits += 1
        if found is None:
            out = original(x, return_dict=return_dict)
            posterior = out.latent_dist if return_dict else out[0]
            if type(posterior) is DiagonalGaussianDistribution:
                # a copy: a caller may change the returned tensors in place
                entry = (posterior.parameters.detach().clone(), posterior.deterministic)
                with self._lock:
                    self.misses += 1
                    self._items[key] = entry
                    while len(self._items) > self.size:
                        self._items.popitem(last=False)
            return out
        parameters, deterministic = found
        posterior = DiagonalGaussianDistribution(parameters.clone(), deterministic=deterministic)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def posterior_key(vae: Any, x: torch.Tensor) -> tuple:
    """What the posterior of `x` under `vae` depends on (see the module docstring)."""
    data = x.detach().contiguous().view(torch.uint8).cpu().numpy()
    digest = hashlib.blake2b(data.data, digest_size=20).digest()
    quant = vae.quant_conv.parameters() if vae.quant_conv is not None else ()
    weights = tuple(
        (p.data_ptr(), p._version, p.dtype)
        for p in itertools.chain(vae.encoder.parameters(), quant)
    )
    settings = (vae.use_slicing, vae.use_tiling, vae.tile_sample_min_size, vae.tile_overlap_factor)
    where = (str(x.device), x.dtype, tuple(x.shape))
    return (digest, where, id(vae), weights, settings, torch.get_num_threads())


def of(engine: Any) -> EncodeCache:
    """The engine's cache (one per engine, so one per model), made on first use."""
    cache = getattr(engine, "encode_cache", None)
    if cache is None:
        cache = engine.__dict__.setdefault("encode_cache", EncodeCache())
    return cache


@contextlib.contextmanager
def scope(engine: Any, pipe: Any) -> Iterator[None]:
    """Serve `pipe.vae.encode` from `engine`'s cache during the block (an `AutoencoderKL`
    only; otherwise, or with the cache disabled, the block runs unchanged)."""
    from diffusers import AutoencoderKL

    vae = getattr(pipe, "vae", None)
    cache = of(engine)
    if type(vae) is not AutoencoderKL or not cache.enabled:
        yield
        return
    _install(vae)
    token = _ACTIVE.set(cache)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        _uninstall(vae)


def _install(vae: Any) -> None:
    with _INSTALL_LOCK:
        entry = _INSTALLED.get(id(vae))
        if entry is not None:
            entry[0] += 1
            return
        before = vae.__dict__.get("encode")  # someone's own wrapper (benchmarks) or None
        original = vae.encode

        def encode(x: torch.Tensor, return_dict: bool = True) -> Any:
            cache = _ACTIVE.get()
            if cache is None:  # another thread, outside a job
                return original(x, return_dict=return_dict)
            return cache.encode(vae, original, x, return_dict)

        vae.encode = encode
        _INSTALLED[id(vae)] = [1, before]


def _uninstall(vae: Any) -> None:
    with _INSTALL_LOCK:
        entry = _INSTALLED[id(vae)]
        entry[0] -= 1
        if entry[0]:
            return
        del _INSTALLED[id(vae)]
        if entry[1] is None:
            del vae.encode
        else:
            vae.encode = entry[1]
