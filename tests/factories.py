"""Factories for the `package.module:factory` source form, used by the tests."""

import torch


class GatedMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 32)
        self.gate = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


def mlp():
    torch.manual_seed(0)
    return GatedMLP().eval(), (torch.randn(3, 16),)


def not_a_module():
    return 42


class PausingMLP(GatedMLP):
    """Pauses in eager calls (the compile's parity check, inside the staged write) when LUFFY_TEST_PAUSE_FILE
    names a file to create first: a test can then signal a compile that is known to be mid-write."""

    def forward(self, x):
        import os
        import pathlib
        import time

        marker = os.environ.get("LUFFY_TEST_PAUSE_FILE")
        if marker and not torch.compiler.is_compiling() and not torch.compiler.is_exporting():
            pathlib.Path(marker).touch()
            time.sleep(120)
        return super().forward(x)


def pausing_mlp():
    torch.manual_seed(0)
    return PausingMLP().eval(), (torch.randn(3, 16),)


def slow_to_build():
    """A factory that takes minutes to build its model (a big checkpoint): signals arrive during capture."""
    import time

    time.sleep(120)
    return mlp()
