"""Train the bundled digits model (rectified flow, classifier-free guidance).

The committed weights come from exactly::

    python -m training.train_digits --steps 3000 --seed 0 \\
        --out src/ertacache/weights/digits_flux.safetensors

Loss: flow matching (Eq. 3), ``|| v_theta(x_t, t, c) - (noise - x_0) ||^2`` with
``x_t = (1 - t) x_0 + t * noise`` and t drawn logit-normal (as SD3 and FLUX do).
Labels are replaced by the null class with probability ``--label-dropout`` so that
the model also learns the unconditional branch. The exported weights are an EMA.

Training resumes from ``OUT.ckpt.safetensors`` (written atomically every
``--save-every`` steps) when it exists.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ertacache.io import atomic_write, atomic_write_text
from ertacache.models.digits import NULL_CLASS, TRANSFORMER_CONFIG, DigitsFlux, digits_images


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, str(tmp)))


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    x_data, y_data = digits_images()

    def batch(gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, x_data.shape[0], (n,), generator=gen)
        return x_data[idx], y_data[idx].clone()

    fit(DigitsFlux(TRANSFORMER_CONFIG), batch, args, {
        "transformer_config": TRANSFORMER_CONFIG,
        "command": "python -m training.train_digits "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out")
        + f" --out {args.out}",
        "data": "sklearn.datasets.load_digits, bilinear 8x8 -> 16x16, scaled to [-1, 1]",
    })


def command_line(module: str, args: argparse.Namespace) -> str:
    """The command that reproduces a training run: ``python -m training.<module>`` (from the repository root)
    with every option set (flags bare, unset options left out), ``--out`` last."""
    def value(v: Any) -> str:
        return "" if v is True else " " + (" ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v))

    options = " ".join(f"--{k.replace('_', '-')}{value(v)}"
                       for k, v in vars(args).items() if k != "out" and v is not None and v is not False)
    return f"python -m training.{module} {options} --out {args.out}"


Batch = Callable[[torch.Generator, int], tuple[torch.Tensor, torch.Tensor]]
"""``batch(generator, n) -> (x_0, labels)``: one training batch."""


def fit(model: torch.nn.Module, batch: Batch,
        args: argparse.Namespace, meta: dict[str, Any]) -> None:
    """Rectified-flow training with label dropout and EMA; resumable; writes the EMA weights and ``meta``.

    Args:
        model: ``model(x_t, t, labels)`` predicts ``noise - x_0``.
        batch: ``batch(generator, n) -> (x_0, labels)``.
        args: steps, batch_size, lr, ema, label_dropout, seed, threads, save_every,
            out, and optionally minutes (a wall-clock budget: the cosine learning-rate
            schedule follows whichever of steps and minutes runs out first, so a run
            cut by the clock still anneals; the meta records the steps done) and
            compile (train through ``torch.compile``; the saved weights are the same
            module's).
    """
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    out = Path(args.out)
    ckpt = out.with_name(out.stem + ".ckpt.safetensors")
    start, spent = 0, 0.0
    null_class = getattr(model, "null_class", NULL_CLASS)
    if ckpt.is_file():
        state = load_file(str(ckpt))
        model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
        ema = {k[4:]: v for k, v in state.items() if k.startswith("ema.")}
        opt_state = {k[4:]: v for k, v in state.items() if k.startswith("opt.")}
        start = int(state["step"].item())
        spent = float(state["seconds"].item()) if "seconds" in state else 0.0
        gen.set_state(state["gen"])
        torch.set_rng_state(state["rng"])
        _load_opt(opt, opt_state)
        print(f"resumed from {ckpt} at step {start}")
    t_start = time.time() - spent
    forward = torch.compile(model) if getattr(args, "compile", False) else model
    with CtrlC() as interrupt:
        step, loss = _loop(model, forward, batch, args, (ema, opt, gen, ckpt), start, t_start, null_class, interrupt)
    _save(ema, out)
    meta = {**meta, "seed": args.seed, "steps": args.steps, "steps_done": step + 1, "final_loss": loss,
            "seconds": round(time.time() - t_start, 1), "torch": torch.__version__}
    atomic_write_text(out.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    ckpt.unlink(missing_ok=True)
    print(f"wrote {out} and {out.with_suffix('.json')}")


class CtrlC:
    """Defers Ctrl-C (SIGINT) to the end of the current training step: the loop checkpoints and exits with 130,
    so an interrupted run resumes from where it stopped. A second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _loop(model: torch.nn.Module, forward: Any, batch: Batch,
          args: argparse.Namespace, state: tuple[dict[str, torch.Tensor], torch.optim.Optimizer, torch.Generator, Path],
          start: int, t_start: float, null_class: int, interrupt: CtrlC) -> tuple[int, float]:
    """The training steps from ``start``; returns the last step run and its loss."""
    ema, opt, gen, ckpt = state
    budget = getattr(args, "minutes", None)
    step, loss = start, torch.tensor(float("nan"))
    for step in range(start, args.steps):
        progress = step / args.steps
        if budget is not None:
            progress = max(progress, (time.time() - t_start) / (60 * budget))
        lr = args.lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        for group in opt.param_groups:
            group["lr"] = lr
        x0, labels = batch(gen, args.batch_size)
        labels[torch.rand(args.batch_size, generator=gen) < args.label_dropout] = null_class
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.sigmoid(torch.randn(args.batch_size, generator=gen))
        tb = t.view(-1, *[1] * (x0.ndim - 1))
        x_t = (1 - tb) * x0 + tb * noise
        loss = (forward(x_t, t, labels) - (noise - x0)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].mul_(decay).add_(v, alpha=1 - decay)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d} loss {loss.item():.4f} lr {lr:.2e} {time.time() - t_start:.0f}s", flush=True)
        if (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            _checkpoint(model, ema, opt, step + 1, gen, ckpt, time.time() - t_start)
        if budget is not None and time.time() - t_start > 60 * budget:
            print(f"stopping at step {step + 1}: the {budget}-minute budget is spent", flush=True)
            break
        if interrupt.requested:
            _checkpoint(model, ema, opt, step + 1, gen, ckpt, time.time() - t_start)
            print(f"interrupted: step {step + 1} is checkpointed in {ckpt}; run the same command again to resume",
                  file=sys.stderr, flush=True)
            raise SystemExit(130)
    return step, float(loss.item())


def _checkpoint(model, ema, opt, step, gen, path: Path, seconds: float) -> None:  # type: ignore[no-untyped-def]
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update({f"ema.{k}": v for k, v in ema.items()})
    state.update({f"opt.{k}": v for k, v in _flatten_opt(opt).items()})
    state["step"] = torch.tensor(step)
    state["seconds"] = torch.tensor(seconds, dtype=torch.float64)
    state["gen"] = gen.get_state()
    state["rng"] = torch.get_rng_state()
    _save(state, path)


def _flatten_opt(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    flat = {}
    for pid, st in opt.state_dict()["state"].items():
        for name, val in st.items():
            flat[f"{pid}.{name}"] = torch.as_tensor(val)
    return flat


def _load_opt(opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, val in flat.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = val
    sd["state"] = state
    opt.load_state_dict(sd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--out", default="src/ertacache/weights/digits_flux.safetensors")
    train(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
