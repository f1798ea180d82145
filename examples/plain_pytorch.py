"""GradHealth's measurements in a plain PyTorch loop (or a Lightning Fabric loop), no Trainer.

The adding problem (see adding_problem.py) with an LSTM, initialized with ``initialize_`` and
watched by ``GradHealthMonitor``, the object the ``GradHealth`` callback is built on: the same
per-timestep gradient norms, spectra, clipping and NaN/Inf checks, written with a plain
``SummaryWriter`` under the same ``gradhealth/`` tags, and the same health report at the end.

Usage:
    python examples/plain_pytorch.py                 # plain PyTorch
    python examples/plain_pytorch.py --fabric        # the same loop under Lightning Fabric
    python examples/plain_pytorch.py --smoke         # a few steps, for tests
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from adding_problem import BASELINE_MSE, adding_problem
from lightning_gradhealth import GradHealthMonitor, format_init_report, initialize_, write_step_output


class AddingLSTM(nn.Module):
    """An LSTM reading the sequence and a linear read-out of its last hidden state."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(2, hidden, batch_first=True)
        self.readout = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.rnn(x)[0][:, -1])


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fabric", action="store_true", help="run the loop under lightning.fabric.Fabric (CPU)")
    parser.add_argument("--seq-len", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logdir", default="runs", help="TensorBoard log directory")
    parser.add_argument("--smoke", action="store_true", help="tiny, fast run (used by the tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seq_len, args.hidden, args.steps = 20, 8, 5

    torch.manual_seed(args.seed)
    data = adding_problem(args.steps * args.batch_size, args.seq_len, torch.Generator().manual_seed(args.seed))
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True)
    model = AddingLSTM(args.hidden)
    init_report = initialize_(model, "orthogonal", generator=torch.Generator().manual_seed(args.seed))
    print(f"GradHealth: initialized {len(init_report)} parameters:\n{format_init_report(init_report)}")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    backward = torch.Tensor.backward
    module = model
    if args.fabric:
        from lightning.fabric import Fabric

        fabric = Fabric(accelerator="cpu", devices=1)
        module, optimizer = fabric.setup(model, optimizer)
        loader = fabric.setup_dataloaders(loader)
        backward = fabric.backward

    monitor = GradHealthMonitor(log_every_n_steps=10, clip="norm", clip_val=1.0)
    monitor.attach(model)  # the module you built; under Fabric its wrapper runs the same submodules
    monitor.record_init(init_report)  # for the report's init column
    writer = SummaryWriter(str(Path(args.logdir) / ("adding_fabric" if args.fabric else "adding_plain")))
    step, loss = 0, torch.tensor(float("nan"))
    try:
        for step, (x, y) in enumerate(loader):
            monitor.start_step(step)  # arms the probe on sampled steps
            loss = nn.functional.mse_loss(module(x), y)
            monitor.stop_capture()
            backward(loss)
            output = monitor.before_optimizer_step(step, list(model.parameters()))  # measure, check, clip
            write_step_output(writer, output, step)
            writer.add_scalar("train/mse", loss.item(), step)
            optimizer.step()
            optimizer.zero_grad()
            if step + 1 >= args.steps:
                break
        print(monitor.finish(step + 1).format())
        write_step_output(writer, monitor.end_of_fit(step + 1), step + 1)  # the final spectra
    finally:
        monitor.detach()
        writer.close()
    print(f"final train MSE {loss.item():.4f} (predicting 1 always scores {BASELINE_MSE:.3f})")
    print(f"TensorBoard: tensorboard --logdir {args.logdir}")
    return loss.item()


if __name__ == "__main__":
    main()
