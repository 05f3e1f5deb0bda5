"""Stop signals when the loop is used from Python (no `install()`): deferred once armed, the previous handler before."""

import os
import signal
import time

import pytest

from jaxalign.train import stop


def send(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.05)  # the handler runs between bytecodes of the main thread


def test_before_arming_ctrl_c_is_a_keyboard_interrupt_after_it_a_request():
    with stop.deferred() as request:
        with pytest.raises(KeyboardInterrupt):
            send(signal.SIGINT)
        request.arm()
        send(signal.SIGTERM)
        assert request.signal_name == "SIGTERM" and request.signal_number == signal.SIGTERM
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_second_signal_goes_to_the_previous_handler():
    with stop.deferred() as request:
        request.arm()
        send(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            send(signal.SIGINT)
    assert request.signal_name == "SIGINT"


def test_training_stopped_exits_with_128_plus_the_signal():
    stopped = stop.TrainingStopped(signal.SIGTERM, "stopped by SIGTERM after step 3")
    assert isinstance(stopped, SystemExit) and stopped.code == 143 and str(stopped) == "stopped by SIGTERM after step 3"
    assert stop.TrainingStopped(signal.SIGINT, "").code == 130
