"""The shared training loop: Ctrl-C checkpoints the finished step and exits 130; the same command resumes."""

import argparse
import os
import signal

import pytest
import torch

from training.train_digits import fit


class Tiny(torch.nn.Module):
    null_class = 3

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.emb = torch.nn.Embedding(4, 4)

    def forward(self, x, t, labels):
        return self.lin(x) + self.emb(labels) + t[:, None]


def args(out, steps=6):
    return argparse.Namespace(steps=steps, batch_size=2, lr=1e-3, ema=0.9, label_dropout=0.1, seed=0, threads=1,
                              save_every=100, out=str(out), minutes=None, compile=False)


def test_ctrl_c_checkpoints_and_the_same_command_resumes(tmp_path, capsys):
    calls = []

    def batch(gen, n):
        calls.append(1)
        if len(calls) == 3:  # Ctrl-C during the third step
            os.kill(os.getpid(), signal.SIGINT)
        return torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)

    out = tmp_path / "m.safetensors"
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stop:
        fit(Tiny(), batch, args(out), {})
    assert stop.value.code == 130
    assert "interrupted: step 3 is checkpointed" in capsys.readouterr().err
    assert out.with_name("m.ckpt.safetensors").is_file() and not out.exists()
    fit(Tiny(), batch, args(out), {})  # the same command again
    assert "resumed from" in capsys.readouterr().out and out.is_file()
    assert len(calls) == 6  # steps 1-3, then 4-6: none lost, none repeated
    assert signal.getsignal(signal.SIGINT) == before  # the handler is given back


def test_recorded_command_parses_back_to_the_same_options(monkeypatch):
    """The command written beside the weights reruns the training: a two-value option (--crop-sides) included."""
    import shlex

    from training import train_photos
    from training.train_digits import command_line

    argv = ["--minutes", "45", "--crop-sides", "32", "48", "--compile", "--out", "/tmp/w.safetensors"]
    parsed: dict = {}

    def capture(model, batch, a, meta):
        parsed.update(vars(a), command=meta["command"])

    monkeypatch.setattr(train_photos, "fit", capture)
    train_photos.main(argv)
    command = parsed.pop("command")
    assert command == command_line("train_photos", argparse.Namespace(**parsed))
    again: dict = {}
    monkeypatch.setattr(train_photos, "fit", lambda model, batch, a, meta: again.update(vars(a)))
    train_photos.main(shlex.split(command)[3:])
    assert again == parsed and again["crop_sides"] == [32, 48]
