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
