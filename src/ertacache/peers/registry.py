"""Every peer method the benchmarks run beside ERTACache: one registry entry each.

An entry says what the peer is called in every table, whose implementation runs, how a
benchmark drives it (its ``kind``), where it runs (the core sampler on a bundled model,
a diffusers pipeline, or both), its sweep of settings (a short one for ``--quick``), how
a setting reads in a table, and what it needs prepared first. The core benchmark
(:mod:`ertacache.bench.methods`) and the pipeline benchmark (:mod:`ertacache.bench.pipeline`)
walk this registry; a new peer is one entry here and, for a new kind, one runner there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

PeerKind = Literal["diffusers_hook", "cache_dit", "model_wrapper"]
"""How a benchmark runs a peer: a diffusers cache config on the transformer (``enable_cache``,
:func:`~.diffusers_hooks.peer_config`), cache-dit's ``enable_cache`` on a pipeline (:mod:`.cache_dit`), or our own
wrapper of the velocity model (:class:`~.teacache.TeaCacheModel`)."""
Where = Literal["core", "pipeline"]


def setting_label(setting: dict[str, Any]) -> str:
    """A setting as the benchmark tables show it (``key=value, ...``, without MagCache's ratios)."""
    return ", ".join(f"{key}={val}" for key, val in setting.items() if key != "mag_ratios")


@dataclass(frozen=True)
class Peer:
    """One peer method.

    Attributes:
        name: its name in every table.
        library: whose implementation runs.
        kind: how a benchmark runs it (:data:`PeerKind`).
        runs_on: where the benchmarks run it.
        sweep: ``sweep(quick)``, the settings (``quick``: the short sweep).
        label: a setting as the tables show it.
        prepare: what its runner computes first: ``mag_ratios`` (MagCache's own calibration run),
            ``coefficients`` (TeaCache's polynomial, fitted on the calibration conditions), or None.
    """

    name: str
    library: str
    kind: PeerKind
    runs_on: tuple[Where, ...]
    sweep: Callable[[bool], list[dict[str, Any]]]
    label: Callable[[dict[str, Any]], str] = setting_label
    prepare: str | None = None


def _quick(short: tuple[Any, ...], full: tuple[Any, ...]) -> Callable[[bool], tuple[Any, ...]]:
    return lambda quick: short if quick else full


_fbc = _quick((0.1, 0.2), (0.08, 0.1, 0.12, 0.15, 0.2, 0.3))
_taylor = _quick((2, 3), (2, 3, 4, 5))
_mag = _quick(((0.06, 3), (0.24, 3)), ((0.02, 3), (0.04, 3), (0.06, 3), (0.12, 3), (0.24, 3), (0.5, 4)))
_pab = _quick((2,), (2, 3, 4, 6))
_tea = _quick((0.02, 0.05, 0.1), (0.01, 0.02, 0.035, 0.05, 0.07, 0.1, 0.15))
_dbcache = _quick((0.08, 0.2), (0.08, 0.12, 0.2, 0.3, 0.5))
_dbcache_taylor = _quick((0.2,), (0.12, 0.2, 0.3))

PEERS: tuple[Peer, ...] = (
    Peer("teacache", "ertacache (TeaCache's rule, written from its paper)", "model_wrapper", ("core",),
         lambda q: [{"threshold": th} for th in _tea(q)], label=lambda s: f"thresh={s['threshold']}",
         prepare="coefficients"),
    Peer("first_block_cache", "diffusers", "diffusers_hook", ("core", "pipeline"),
         lambda q: [{"threshold": th} for th in _fbc(q)]),
    Peer("taylorseer", "diffusers", "diffusers_hook", ("core", "pipeline"),
         lambda q: [{"cache_interval": k, "disable_cache_before_step": 2, "max_order": 1} for k in _taylor(q)]),
    Peer("magcache", "diffusers", "diffusers_hook", ("core", "pipeline"),
         lambda q: [{"threshold": th, "max_skip_steps": k} for th, k in _mag(q)], prepare="mag_ratios"),
    Peer("pab", "diffusers", "diffusers_hook", ("core", "pipeline"),
         lambda q: [{"spatial_attention_block_skip_range": k, "spatial_attention_timestep_skip_range": (0, 1000)}
                    for k in _pab(q)]),
    # in diffusers 0.42 FasterCache hooks only the legacy Attention class, not FluxAttention: a no-op on FLUX
    Peer("fastercache", "diffusers", "diffusers_hook", ("core", "pipeline"),
         lambda q: [{"spatial_attention_block_skip_range": 2}]),
    Peer("cache_dit_dbcache", "cache-dit", "cache_dit", ("core",),
         lambda q: [{"threshold": th, "taylorseer": False} for th in _dbcache(q)],
         label=lambda s: f"F1B0, threshold={s['threshold']}"),
    Peer("cache_dit_dbcache+taylorseer", "cache-dit", "cache_dit", ("core",),
         lambda q: [{"threshold": th, "taylorseer": True} for th in _dbcache_taylor(q)],
         label=lambda s: f"F1B0, threshold={s['threshold']}"),
)
"""The peers, in the order the tables list them."""


def peers(where: Where, kind: PeerKind | None = None) -> list[Peer]:
    """The peers that run ``where`` (of one ``kind``, or all)."""
    return [p for p in PEERS if where in p.runs_on and (kind is None or p.kind == kind)]


def peer(name: str) -> Peer:
    """The registry entry ``name``.

    Raises:
        ValueError: not a registered peer (the message lists them).
    """
    for p in PEERS:
        if p.name == name:
            return p
    raise ValueError(f"unknown peer {name!r}; the peers are {[p.name for p in PEERS]}")
