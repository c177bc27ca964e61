"""Server optimizers: golden numbers computed by hand for two rounds each, and one contract for all of them.

Float32 params are compared with ``rel=1e-6`` (float32 keeps about 7 digits), float64 state with ``rel=1e-12``.
"""

import math

import numpy as np
import pytest

from fedloom.core import ConfigError, Params
from fedloom.strategy.optimizers import Adagrad, Adam, ServerOptimizer, ServerSGD, Yogi

F32 = 1e-6
F64 = 1e-12


def f32(**arrays: list[float]) -> Params:
    return Params({name: np.array(values, dtype=np.float32) for name, values in arrays.items()})


def two_steps(opt: ServerOptimizer, x: Params, deltas: list[Params]) -> list[tuple[Params, Params]]:
    """``(params, state)`` after each step, starting from ``opt.init(x)``."""
    state = opt.init(x)
    out = []
    for delta in deltas:
        x, state = opt.step(x, delta, state)
        out.append((x, state))
    return out


def test_adam_two_steps_by_hand():
    # eta = 3, beta1 = 0.5, beta2 = 0.5, tau = 1: m starts at 0, v at tau^2 = 1. x = [1, 2].
    opt = Adam(eta=3.0, beta1=0.5, beta2=0.5, tau=1.0)
    x = f32(w=[1.0, 2.0])
    assert list(opt.init(x)) == ["m/w", "v/w"]
    assert opt.init(x)["v/w"].tolist() == [1.0, 1.0]
    (x1, s1), (x2, s2) = two_steps(opt, x, [f32(w=[1.0, -7.0]), f32(w=[7.0, 5.0])])
    # Round 1, delta = [1, -7]:
    #   m = 0.5 * 0 + 0.5 * [1, -7] = [0.5, -3.5]
    #   v = 0.5 * 1 + 0.5 * [1, 49] = [1, 25]; sqrt(v) + tau = [2, 6]
    #   x = [1, 2] + 3 * [0.5 / 2, -3.5 / 6] = [1 + 0.75, 2 - 1.75] = [1.75, 0.25]
    assert s1["m/w"].tolist() == pytest.approx([0.5, -3.5], rel=F64)
    assert s1["v/w"].tolist() == pytest.approx([1.0, 25.0], rel=F64)
    assert x1["w"].tolist() == pytest.approx([1.75, 0.25], rel=F32)
    # Round 2, delta = [7, 5]:
    #   m = 0.5 * [0.5, -3.5] + 0.5 * [7, 5] = [0.25 + 3.5, -1.75 + 2.5] = [3.75, 0.75]
    #   v = 0.5 * [1, 25] + 0.5 * [49, 25] = [25, 25]; sqrt(v) + tau = [6, 6]
    #   x = [1.75, 0.25] + 3 * [3.75 / 6, 0.75 / 6] = [1.75 + 1.875, 0.25 + 0.375] = [3.625, 0.625]
    assert s2["m/w"].tolist() == pytest.approx([3.75, 0.75], rel=F64)
    assert s2["v/w"].tolist() == pytest.approx([25.0, 25.0], rel=F64)
    assert x2["w"].tolist() == pytest.approx([3.625, 0.625], rel=F32)


def test_adam_defaults_one_step_by_hand():
    # eta = 0.01, beta1 = 0.9, beta2 = 0.99, tau = 1e-3; x = 1, delta = 2, in float64:
    #   m = 0.1 * 2 = 0.2
    #   v = 0.99 * 1e-6 + 0.01 * 4 = 0.04000099; sqrt(v) = 0.2 * sqrt(1.00002475) = 0.200002475
    #   x = 1 + 0.01 * 0.2 / (0.200002475 + 0.001) = 1 + 0.002 / 0.201002475 = 1 + 0.00995012624 = 1.00995012624
    x = Params({"w": np.array([1.0])})
    x, state = Adam().step(x, Params({"w": np.array([2.0])}), Adam().init(x))
    assert state["m/w"][0] == pytest.approx(0.2, rel=F64)
    assert state["v/w"][0] == pytest.approx(0.04000099, rel=F64)
    assert x["w"][0] == pytest.approx(1.00995012624, abs=1e-11)


def test_yogi_two_steps_by_hand_with_both_signs():
    # eta = 2, beta1 = 0.25, beta2 = 0.25 (so 1 - beta2 = 0.75), tau = 0.5: v starts at tau^2 = 0.25. x = [1, 2].
    opt = Yogi(eta=2.0, beta1=0.25, beta2=0.25, tau=0.5)
    x = f32(w=[1.0, 2.0])
    (x1, s1), (x2, s2) = two_steps(opt, x, [f32(w=[4.0, -1.0]), f32(w=[1.5, -2.0])])
    # Round 1, delta = [4, -1], delta^2 = [16, 1]: v - delta^2 = [0.25 - 16, 0.25 - 1] < 0, sign -1, so v grows:
    #   m = 0.75 * [4, -1] = [3, -0.75]
    #   v = [0.25 + 0.75 * 16, 0.25 + 0.75 * 1] = [12.25, 1]; sqrt(v) + tau = [3.5 + 0.5, 1 + 0.5] = [4, 1.5]
    #   x = [1, 2] + 2 * [3 / 4, -0.75 / 1.5] = [1 + 1.5, 2 - 1] = [2.5, 1]
    assert s1["m/w"].tolist() == pytest.approx([3.0, -0.75], rel=F64)
    assert s1["v/w"].tolist() == pytest.approx([12.25, 1.0], rel=F64)
    assert x1["w"].tolist() == pytest.approx([2.5, 1.0], rel=F32)
    # Round 2, delta = [1.5, -2], delta^2 = [2.25, 4]:
    #   coordinate 0: v - delta^2 = 12.25 - 2.25 > 0, sign +1, v shrinks: v = 12.25 - 0.75 * 2.25 = 10.5625 = 3.25^2
    #   (Adam would forget far faster: 0.25 * 12.25 + 0.75 * 2.25 = 4.75)
    #   coordinate 1: v - delta^2 = 1 - 4 < 0, sign -1, v grows: v = 1 + 0.75 * 4 = 4 = 2^2
    #   m = 0.25 * [3, -0.75] + 0.75 * [1.5, -2] = [0.75 + 1.125, -0.1875 - 1.5] = [1.875, -1.6875]
    #   x = [2.5, 1] + 2 * [1.875 / (3.25 + 0.5), -1.6875 / (2 + 0.5)] = [2.5 + 2 * 0.5, 1 - 2 * 0.675] = [3.5, -0.35]
    assert s2["m/w"].tolist() == pytest.approx([1.875, -1.6875], rel=F64)
    assert s2["v/w"].tolist() == pytest.approx([10.5625, 4.0], rel=F64)
    assert x2["w"].tolist() == pytest.approx([3.5, -0.35], rel=F32)


def test_adagrad_two_steps_by_hand():
    # eta = 2, beta1 = 0 (the default, so m = delta), tau = 0.75: v starts at tau^2 = 0.5625. x = [1, 2].
    opt = Adagrad(eta=2.0, tau=0.75)
    x = f32(w=[1.0, 2.0])
    (x1, s1), (x2, s2) = two_steps(opt, x, [f32(w=[1.0, -1.0]), f32(w=[3.0, 0.0])])
    # Round 1, delta = [1, -1]:
    #   v = 0.5625 + [1, 1] = [1.5625, 1.5625] = 1.25^2; sqrt(v) + tau = 2
    #   x = [1, 2] + 2 * [1, -1] / 2 = [2, 1]
    assert s1["m/w"].tolist() == pytest.approx([1.0, -1.0], rel=F64)
    assert s1["v/w"].tolist() == pytest.approx([1.5625, 1.5625], rel=F64)
    assert x1["w"].tolist() == pytest.approx([2.0, 1.0], rel=F32)
    # Round 2, delta = [3, 0]: v only ever grows, and a zero delta leaves it (and x) where it was:
    #   v = [1.5625 + 9, 1.5625 + 0] = [10.5625, 1.5625]; sqrt(v) + tau = [3.25 + 0.75, 2] = [4, 2]
    #   x = [2, 1] + 2 * [3 / 4, 0 / 2] = [3.5, 1]
    assert s2["m/w"].tolist() == pytest.approx([3.0, 0.0], rel=F64)
    assert s2["v/w"].tolist() == pytest.approx([10.5625, 1.5625], rel=F64)
    assert x2["w"].tolist() == pytest.approx([3.5, 1.0], rel=F32)


def test_server_sgd_with_momentum_two_steps_by_hand():
    # FedAvgM, lr = 0.5, momentum = 0.5: v starts at 0. x = [1, 2].
    opt = ServerSGD(lr=0.5, momentum=0.5)
    x = f32(w=[1.0, 2.0])
    assert list(opt.init(x)) == ["momentum/w"]
    (x1, s1), (x2, s2) = two_steps(opt, x, [f32(w=[2.0, -4.0]), f32(w=[1.0, 2.0])])
    # Round 1, delta = [2, -4]: v = 0.5 * 0 + [2, -4] = [2, -4]; x = [1, 2] + 0.5 * [2, -4] = [2, 0]
    assert s1["momentum/w"].tolist() == [2.0, -4.0]
    assert x1["w"].tolist() == [2.0, 0.0]
    # Round 2, delta = [1, 2]: v = 0.5 * [2, -4] + [1, 2] = [2, 0]; x = [2, 0] + 0.5 * [2, 0] = [3, 0]
    # (on coordinate 1 the momentum cancels this round's delta)
    assert s2["momentum/w"].tolist() == [2.0, 0.0]
    assert x2["w"].tolist() == [3.0, 0.0]


def test_server_sgd_defaults_are_fedavg_bit_for_bit():
    rng = np.random.default_rng(0)
    x = Params({"w": rng.normal(size=(4, 5)).astype(np.float32), "b": rng.normal(size=3).astype(np.float32)})
    opt = ServerSGD()
    state = opt.init(x)
    assert len(state) == 0  # without momentum there is nothing to remember
    for _ in range(2):
        delta = Params({name: rng.normal(size=a.shape).astype(np.float32) * 1e-3 for name, a in x.items()})
        fedavg = {
            name: (a.astype(np.float64) + delta[name].astype(np.float64)).astype(np.float32) for name, a in x.items()
        }
        x, state = opt.step(x, delta, state)
        assert x == Params(fedavg)
        assert len(state) == 0


OPTIMIZERS = [ServerSGD(), ServerSGD(lr=0.5, momentum=0.9), Adagrad(), Adam(), Yogi()]


def mixed() -> tuple[Params, Params]:
    """Params of several dtypes, a float32 weight first, and a delta for them (float deltas for integer
    counters, as a mean minus x gives)."""
    x = Params(
        {
            "w": np.array([[1.0, 2.0]], dtype=np.float32),
            "count": np.array([3, 10, 7], dtype=np.int64),
            "h": np.array([0.5], dtype=np.float16),
            "flag": np.array([True, False]),
            "d": np.array(4.0, dtype=np.float64),
        }
    )
    delta = Params(
        {
            "w": np.array([[0.1, -0.2]], dtype=np.float32),
            "count": np.array([0.4, 1.6, -2.5]),
            "h": np.array([0.25], dtype=np.float16),
            "flag": np.array([-0.75, 0.75]),
            "d": np.array(-1.0),
        }
    )
    return x, delta


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=repr)
def test_integer_arrays_are_rounded_and_get_no_state(opt: ServerOptimizer):
    x, delta = mixed()
    state = opt.init(x)
    assert not any(key.endswith(("/count", "/flag")) for key in state)
    new, new_state = opt.step(x, delta, state)
    # round([3.4, 11.6, 4.5]) = [3, 12, 4] (half to even, like FedAvg's np.rint); round([0.25, 0.75]) = [0, 1]
    assert new["count"].tolist() == [3, 12, 4]
    assert new["flag"].tolist() == [False, True]
    assert list(new_state) == list(state)


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=repr)
def test_order_dtypes_and_state_layout_are_kept(opt: ServerOptimizer):
    x, delta = mixed()
    state = opt.init(x)
    assert all(a.dtype == np.float64 for a in state.values())
    assert [key.split("/", 1)[1] for key in state] == ["w", "h", "d"] * (len(state) // 3)
    new, new_state = opt.step(x, delta, state)
    assert list(new) == list(x)
    assert [a.dtype for a in new.values()] == [a.dtype for a in x.values()]
    assert [a.shape for a in new.values()] == [a.shape for a in x.values()]
    assert list(new_state) == list(state)
    assert all(a.dtype == np.float64 for a in new_state.values())


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=repr)
def test_inputs_are_not_mutated(opt: ServerOptimizer):
    x, delta = mixed()
    state = opt.step(x, delta, opt.init(x))[1]  # a state that is not all zeros
    copies = [Params(dict(p)) for p in (x, delta, state)]
    opt.step(x, delta, state)
    assert [x, delta, state] == copies


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ServerSGD(lr=0.0), "lr"),
        (lambda: ServerSGD(lr=-1.0), "lr"),
        (lambda: ServerSGD(lr=math.inf), "lr"),
        (lambda: ServerSGD(momentum=1.0), "momentum"),
        (lambda: ServerSGD(momentum=-0.1), "momentum"),
        (lambda: Adagrad(eta=0.0), "eta"),
        (lambda: Adagrad(tau=0.0), "tau"),
        (lambda: Adagrad(beta1=1.0), "beta1"),
        (lambda: Adam(eta=math.nan), "eta"),
        (lambda: Adam(beta1=-0.1), "beta1"),
        (lambda: Adam(beta2=1.0), "beta2"),
        (lambda: Yogi(tau=-1e-3), "tau"),
        (lambda: Yogi(beta2=-0.5), "beta2"),
    ],
)
def test_bad_settings_are_config_errors(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


@pytest.mark.parametrize("opt", [ServerSGD(momentum=0.9), Adam()], ids=repr)
def test_mismatched_delta_or_state_is_a_config_error(opt: ServerOptimizer):
    x = f32(w=[1.0, 2.0], b=[0.0])
    state = opt.init(x)
    with pytest.raises(ConfigError, match=r"delta does not match params: missing \['b'\]"):
        opt.step(x, f32(w=[1.0, 2.0]), state)
    with pytest.raises(ConfigError, match=r"unexpected \['c'\]"):
        opt.step(x, f32(w=[1.0, 2.0], b=[0.0], c=[0.0]), state)
    with pytest.raises(ConfigError, match=r"delta\['w'\] has shape \(3,\)"):
        opt.step(x, f32(w=[1.0, 2.0, 3.0], b=[0.0]), state)
    with pytest.raises(ConfigError, match="state does not match params"):
        opt.step(x, f32(w=[1.0, 2.0], b=[0.0]), Yogi().init(f32(w=[1.0, 2.0])))
    with pytest.raises(ConfigError, match="state does not match params"):
        opt.step(x, f32(w=[1.0, 2.0], b=[0.0]), Params({}))
    bad_shape = Params({key: np.zeros(3) if key.endswith("/w") else a for key, a in state.items()})
    with pytest.raises(ConfigError, match=r"state\['.*/w'\] has shape \(3,\)"):
        opt.step(x, f32(w=[1.0, 2.0], b=[0.0]), bad_shape)


def test_params_of_an_unsupported_dtype_are_a_config_error():
    with pytest.raises(ConfigError, match="dtype complex128"):
        Adam().init(Params({"z": np.array([1j])}))
