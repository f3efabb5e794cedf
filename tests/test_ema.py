"""The fine-tune's weight average (``--ema-decay``): the closed form of an exponential moving average over the
recorded trajectory, BN statistics included, and a killed run that resumes to the same averaged weights."""

import pytest
import torch
from torch import nn

from toolchain.train.loop import Recipe, fit, make_ema, train_one_epoch


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 2))


class _Batches:
    """A fixed list of batches, the same every epoch (fit calls set_epoch)."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.batches = [(torch.randn(8, 1, 4, 4, generator=g), torch.randint(0, 2, (8,), generator=g))
                        for _ in range(n)]

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class _RecordingScheduler:
    """Stands in for the LR scheduler, which train_one_epoch steps right after the optimizer: records the weights
    (and BN statistics) each step produced."""

    def __init__(self, model: nn.Module):
        self.model, self.states = model, []

    def step(self) -> None:
        self.states.append({k: v.detach().clone().double() for k, v in self.model.state_dict().items()
                            if v.is_floating_point()})


def _floats(state: dict) -> dict:
    return {k: v.detach().double() for k, v in state.items() if v.is_floating_point()}


def test_the_average_is_the_closed_form_over_the_trajectory_bn_statistics_included():
    model, decay = _model(), 0.8
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    recorder = _RecordingScheduler(model)
    ema = make_ema(model, decay)
    train_one_epoch(model, _Batches(6, seed=1), opt, recorder, torch.device("cpu"), Recipe(epochs=1, lr=0.2,
                    amp="off"), ema=ema)
    w = recorder.states  # w[0] after the first step: the average starts as a copy of it
    assert len(w) == 6
    for name, got in _floats(ema.module.state_dict()).items():
        want = decay ** (len(w) - 1) * w[0][name] + sum((1 - decay) * decay ** (len(w) - 1 - t) * w[t][name]
                                                         for t in range(1, len(w)))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    # the raw weights moved away from it (a test that passes with the average equal to the model would be void)
    assert not torch.allclose(_floats(model.state_dict())["0.weight"], _floats(ema.module.state_dict())["0.weight"])
    assert not torch.allclose(w[-1]["1.running_mean"], _floats(ema.module.state_dict())["1.running_mean"])


class _Killed(Exception):
    pass


def test_fit_ends_on_the_average_and_a_killed_run_resumes_to_the_same_weights(tmp_path):
    recipe = Recipe(epochs=3, lr=0.05, amp="off", ema_decay=0.9)
    train, test = _Batches(5, seed=2), _Batches(2, seed=3)
    cpu = torch.device("cpu")

    whole = _model()
    history = fit(whole, train, test, cpu, recipe, tmp_path / "whole")
    assert [sorted(h) for h in history] == [sorted(["loss", "train_acc", "test_acc", "test_acc_ema", "epoch",
                                                    "secs"])] * 3
    ckpt = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    ema_state = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    for name, value in _floats(whole.state_dict()).items():  # the model holds the average, not the raw weights
        torch.testing.assert_close(value, ema_state[name].double(), msg=name)
    assert not torch.allclose(whole.state_dict()["0.weight"], ckpt["model"]["0.weight"])

    def kill_after_first(stats):
        if stats["epoch"] == 1:
            raise _Killed

    killed = _model()
    with pytest.raises(_Killed):
        fit(killed, train, test, cpu, recipe, tmp_path / "resumed", on_epoch=kill_after_first)
    resumed = _model()  # a new process: fresh weights, the checkpoint brings back the model, optimizer and average
    resumed_history = fit(resumed, train, test, cpu, recipe, tmp_path / "resumed")
    assert [h["test_acc_ema"] for h in resumed_history] == [h["test_acc_ema"] for h in history]
    for name, value in _floats(whole.state_dict()).items():
        torch.testing.assert_close(_floats(resumed.state_dict())[name], value, rtol=0, atol=1e-6, msg=name)


def test_without_a_decay_fit_ends_on_the_raw_weights(tmp_path):
    model = _model()
    history = fit(model, _Batches(3, seed=4), _Batches(1, seed=5), torch.device("cpu"),
                  Recipe(epochs=1, lr=0.05, amp="off"), tmp_path)
    assert "test_acc_ema" not in history[0]
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert "ema" not in ckpt
    for name, value in model.state_dict().items():
        assert torch.equal(value, ckpt["model"][name]), name
